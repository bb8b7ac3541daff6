"""The Slicer face against real MRML (slicer-core): geometry, grid transforms, result nodes, export, scenes.

Volumes are small (about 32 voxels a side) with oblique, anisotropic, left-handed IJK-to-RAS matrices, so any
axis flip, permutation or RAS/LPS slip shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

try:
    import slicer  # noqa: F401  (slicer-core: real MRML, headless)
except ImportError as err:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"SKIPPING ALL MRML TESTS: `import slicer` failed ({err}). Install slicer-core (pip install slicer-core, "
        "Python >= 3.10) to test the Slicer face.",
        allow_module_level=True,
    )

import SimpleITK as sitk  # noqa: N813
import slicer_scene as ss
import vtk

from DTNRegistrationLib import mrml
from DTNRegistrationLib.core import metrics, registration

# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(ss.write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors"))


@pytest.fixture
def context():
    return ss.headless_scene()


@pytest.fixture(scope="module")
def engine_run(tiny_model):
    """One real registration through the Logic (shared by the tests that inspect its nodes)."""
    context = ss.headless_scene()
    moving, fixed, segmentation, labels = ss.make_test_volumes(context)
    before = {node.GetID(): ss.node_checksum(node) for node in (moving, fixed, segmentation)}
    ids_before = ss.node_ids(context.scene)
    messages = []
    logic = mrml.RegistrationLogic(context=context)
    nodes = logic.process(
        moving,
        fixed,
        model=tiny_model,
        device="cpu",
        refine=3,
        moving_segmentation_node=segmentation,
        progress=lambda fraction, message: messages.append((fraction, message)),
    )
    return {
        "context": context,
        "moving": moving,
        "fixed": fixed,
        "segmentation": segmentation,
        "labels": labels,
        "nodes": nodes,
        "result": logic.last_result,
        "before": before,
        "ids_before": ids_before,
        "messages": messages,
    }


def array_of(node) -> np.ndarray:
    return np.array(slicer.util.arrayFromVolume(node))


def segment_array(segmentation_node, segment_id: str, reference: sitk.Image) -> np.ndarray:
    """A segment's voxels on a reference grid, read back through Slicer's own export to a label map."""
    context_scene = segmentation_node.GetScene()
    label = context_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    ref_node = context_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
    mrml.update_volume_from_image(ref_node, reference)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, ids, label, ref_node
    )
    out = mrml.volume_to_image(label)
    assert np.allclose(out.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(out.GetDirection(), reference.GetDirection(), atol=1e-6)
    array = sitk.GetArrayFromImage(out) > 0
    for node in (label, ref_node):
        context_scene.RemoveNode(node)
    return array


def synthetic_result(moving: sitk.Image, fixed: sitk.Image, amplitude: float = 2.0, labels=None):
    """A RegistrationResult with a known smooth field (``amplitude`` 3+ folds it), as the engine would give."""
    size = fixed.GetSize()
    ras = ss.ras_grid(size, mrml.image_ijk_to_ras(fixed))
    lps = ras * np.array([-1.0, -1.0, 1.0])
    field = np.zeros(lps.shape, np.float64)
    field[..., 0] = amplitude * np.sin(lps[..., 0] / 2.0)
    field[..., 1] = 1.5 * np.cos(lps[..., 1] / 6.0 + lps[..., 2] / 7.0)
    field[..., 2] = np.sin(lps[..., 0] / 4.0 + lps[..., 1] / 9.0)
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(fixed)
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    jac = metrics.physical_jacobian_determinant(field, fixed.GetSpacing(), fixed.GetDirection())
    jacobian = sitk.GetImageFromArray(jac)
    jacobian.CopyInformation(fixed)
    folding = sitk.GetImageFromArray((jac <= 0).astype(np.uint8))
    folding.CopyInformation(fixed)
    warped_labels = None
    if labels is not None:
        warped_labels = sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    count, percent = metrics.folding(jac)
    return registration.RegistrationResult(
        warped=warped,
        displacement=displacement,
        inverse_displacement=displacement,
        jacobian=jacobian,
        folding=folding,
        warped_labels=warped_labels,
        metrics={"folding_count": count, "folding_percent": percent},
        timings={"total": 0.1},
        device="cpu",
        model={"name": "synthetic", "sha256": "0" * 64, "variant": "none"},
        alpha=0.1,
    )


def resample_through(context, moving_node, transform_node, fixed_node) -> np.ndarray:
    """Slicer's own resampling of the moving volume through a transform onto the fixed grid (input restored)."""
    moving_node.SetAndObserveTransformNodeID(transform_node.GetID())
    try:
        out = context.volumes_logic.ResampleVolumeToReferenceVolume(moving_node, fixed_node)
    finally:
        moving_node.SetAndObserveTransformNodeID(None)
    image = mrml.volume_to_image(out, world=False)
    assert image.GetSize() == mrml.volume_to_image(fixed_node).GetSize()
    array = sitk.GetArrayFromImage(image)
    context.scene.RemoveNode(out)
    return array


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matrix", [ss.FIXED_IJK_TO_RAS, ss.MOVING_IJK_TO_RAS], ids=["flip-I", "flip-K"])
def test_volume_to_image_follows_ijk_to_ras_exactly(context, matrix):
    assert np.linalg.det(matrix[:3, :3]) < 0, "the test geometry must be left-handed"
    array = np.random.default_rng(1).random((20, 24, 28)).astype(np.float32)
    node = ss.add_volume_from_array(context, array, matrix, "vol")
    image = mrml.volume_to_image(node)
    assert image.GetSize() == (28, 24, 20)
    for ijk in [(0, 0, 0), (27, 0, 0), (3, 5, 7), (27, 23, 19)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = (matrix @ [*ijk, 1.0])[:3]
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
        assert image[ijk] == array[ijk[2], ijk[1], ijk[0]]
    back = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "back")
    mrml.update_volume_from_image(back, image)
    np.testing.assert_allclose(ss.ijk_to_ras_of(back), matrix, atol=1e-12)
    np.testing.assert_array_equal(array_of(back), array)


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
def test_geometry_agrees_with_slicer_and_itk_file_io(context, tmp_path, extension):
    """Slicer's writer + ITK's reader, and ITK's writer + Slicer's reader, agree with the in-memory conversion."""
    array = np.random.default_rng(2).random((20, 24, 28)).astype(np.float32)
    node = ss.add_volume_from_array(context, array, ss.MOVING_IJK_TO_RAS, "vol")
    image = mrml.volume_to_image(node)

    written = tmp_path / f"slicer{extension}"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    context.scene.AddNode(storage)
    storage.SetFileName(str(written))
    assert storage.WriteData(node)
    from_itk = sitk.ReadImage(str(written))
    same_grid = sitk.Resample(from_itk, image, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same_grid), array)

    itk_file = tmp_path / f"itk{extension}"
    sitk.WriteImage(image, str(itk_file))
    loaded = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    context.scene.AddNode(reader)
    reader.SetFileName(str(itk_file))
    assert reader.ReadData(loaded)
    # Slicer may reverse a left-handed axis on reading: physically the same image, so compare in space.
    from_slicer = mrml.volume_to_image(loaded)
    same_grid = sitk.Resample(from_slicer, image, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same_grid), array)


def test_linear_parent_transform_is_applied_and_nonlinear_refused(context):
    array = np.random.default_rng(3).random((8, 9, 10)).astype(np.float32)
    node = ss.add_volume_from_array(context, array, ss.FIXED_IJK_TO_RAS, "vol")
    linear = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)
    linear.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(linear.GetID())
    image = mrml.volume_to_image(node)
    np.testing.assert_allclose(image.GetOrigin(), (ss.FIXED_IJK_TO_RAS[:3, 3] + [5.0, 0, 0]) * [-1, -1, 1], atol=1e-9)
    grid = context.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid")
    fixed = mrml.volume_to_image(node, world=False)
    grid.SetAndObserveTransformFromParent(
        mrml.displacement_to_grid_transform(sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64))
    )
    linear.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ValueError, match="non-linear transform"):
        mrml.volume_to_image(node)


def test_grid_transform_reproduces_itk_resampling(context):
    """A field set FromParent on a grid transform node resamples like SimpleITK's DisplacementFieldTransform."""
    moving, fixed, _, _ = ss.make_test_volumes(context)
    moving_image, fixed_image = mrml.volume_to_image(moving), mrml.volume_to_image(fixed)
    result = synthetic_result(moving_image, fixed_image, amplitude=1.0)
    node = context.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "t")
    node.SetAndObserveTransformFromParent(mrml.displacement_to_grid_transform(result.displacement))
    slicer_warped = resample_through(context, moving, node, fixed)
    itk_warped = sitk.GetArrayFromImage(result.warped)
    assert np.count_nonzero(itk_warped) > 0.3 * itk_warped.size
    np.testing.assert_array_equal(slicer_warped != 0, itk_warped != 0)
    np.testing.assert_allclose(slicer_warped, itk_warped, atol=1e-3 * np.abs(itk_warped).max())
    back = mrml.grid_transform_to_displacement(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(result.displacement))
    np.testing.assert_allclose(back.GetDirection(), fixed_image.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), fixed_image.GetOrigin(), atol=1e-9)


def test_segmentation_to_labels_on_the_moving_grid(context):
    moving, _, segmentation, labels = ss.make_test_volumes(context)
    before = ss.node_ids(context.scene)
    image, segments = mrml.segmentation_to_labels(segmentation, moving, mrml.volume_to_image(moving), context)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert [(s.label, s.name) for s in segments] == [(1, "Head"), (2, "Core")]
    assert segments[0].color == pytest.approx((0.2, 0.8, 0.2))
    assert ss.node_ids(context.scene) == before, "reading a segmentation must not add nodes"


# ----------------------------------------------------------------------------------------------------------------
# The Logic end to end (engine + nodes)
# ----------------------------------------------------------------------------------------------------------------


def test_logic_creates_every_result_node(engine_run):
    nodes, scene = engine_run["nodes"], engine_run["context"].scene
    expected = {
        "transform": "vtkMRMLGridTransformNode",
        "warped": "vtkMRMLScalarVolumeNode",
        "jacobian": "vtkMRMLScalarVolumeNode",
        "folding": "vtkMRMLSegmentationNode",
        "segmentation": "vtkMRMLSegmentationNode",
        "labelmap": "vtkMRMLLabelMapVolumeNode",
    }
    assert set(nodes) == set(expected)
    for role, cls in expected.items():
        assert nodes[role].GetClassName() == cls
        assert scene.IsNodePresent(nodes[role])
    assert nodes["warped"].GetName() == "moving warped to fixed"
    assert nodes["transform"].GetName() == "moving to fixed DTN transform"
    assert nodes["segmentation"].GetName() == "moving segmentation on fixed"
    for role in ("warped", "jacobian", "folding", "segmentation", "labelmap"):
        assert nodes[role].GetNodeReferenceID("DTNRegistration.transform") == nodes["transform"].GetID()
        assert nodes[role].GetNodeReferenceID("DTNRegistration.fixed") == engine_run["fixed"].GetID()
    fractions = [f for f, _ in engine_run["messages"]]
    assert all(b >= a - 1e-9 for a, b in zip(fractions, fractions[1:])) and fractions[-1] == 1.0


def test_transform_node_resamples_to_the_engine_warped_image(engine_run):
    run, result = engine_run, engine_run["result"]
    transform = run["nodes"]["transform"]
    grid = transform.GetTransformFromParentAs("vtkOrientedGridTransform")
    assert grid is not None and grid.GetInterpolationModeAsString() == "Linear"
    slicer_warped = resample_through(run["context"], run["moving"], transform, run["fixed"])
    engine_warped = sitk.GetArrayFromImage(result.warped)
    inside = (slicer_warped != 0) & (engine_warped != 0)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(slicer_warped[inside], engine_warped[inside], atol=1e-3 * engine_warped.max())
    assert ((slicer_warped != 0) != (engine_warped != 0)).mean() < 1e-3  # boundary voxels only
    np.testing.assert_array_equal(array_of(run["nodes"]["warped"]), engine_warped)
    warped_geometry = mrml.volume_to_image(run["nodes"]["warped"])
    fixed_geometry = mrml.volume_to_image(run["fixed"])
    np.testing.assert_allclose(warped_geometry.GetDirection(), fixed_geometry.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(warped_geometry.GetOrigin(), fixed_geometry.GetOrigin(), atol=1e-9)


def test_jacobian_node_equals_engine_and_has_a_colour_table(engine_run):
    run, result = engine_run, engine_run["result"]
    jacobian = run["nodes"]["jacobian"]
    np.testing.assert_array_equal(array_of(jacobian), sitk.GetArrayFromImage(result.jacobian))
    # Independently: det J of the field stored in the transform node.
    field = sitk.GetArrayFromImage(mrml.grid_transform_to_displacement(run["nodes"]["transform"]))
    fixed = result.jacobian
    recomputed = metrics.physical_jacobian_determinant(field, fixed.GetSpacing(), fixed.GetDirection())
    np.testing.assert_allclose(array_of(jacobian), recomputed, atol=1e-4)
    display = jacobian.GetDisplayNode()
    color = display.GetColorNode()
    assert color is not None and color.GetName() == mrml.JACOBIAN_COLOR_NODE_NAME
    assert color.GetNumberOfColors() == 256
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((2.0, 1.0))


def test_folding_overlay_of_the_engine_run(engine_run):
    run, result = engine_run, engine_run["result"]
    folding = run["nodes"]["folding"]
    segment = folding.GetSegmentation().GetSegment(mrml.FOLDING_SEGMENT_ID)
    assert segment is not None and segment.GetColor() == pytest.approx(mrml.FOLDING_COLOR)
    expected = sitk.GetArrayFromImage(result.jacobian) <= 0
    got = segment_array(folding, mrml.FOLDING_SEGMENT_ID, result.jacobian)
    np.testing.assert_array_equal(got, expected)
    assert folding.GetAttribute("DTNRegistration.folding_count") == str(int(expected.sum()))


def test_folding_overlay_marks_exactly_nonpositive_jacobian(context):
    """With a field that folds, the red segment covers exactly the det J <= 0 voxels."""
    moving, fixed, _, _ = ss.make_test_volumes(context)
    fixed_image = mrml.volume_to_image(fixed)
    result = synthetic_result(mrml.volume_to_image(moving), fixed_image, amplitude=3.0)
    jac = sitk.GetArrayFromImage(result.jacobian)
    assert 0 < (jac <= 0).sum() < jac.size // 2, "the synthetic field must fold somewhere"
    job = mrml.RegistrationJob(
        moving=None, fixed=fixed_image, node_ids={"moving": moving.GetID(), "fixed": fixed.GetID()}
    )
    nodes = mrml.RegistrationLogic(context=context).build(job, result)
    got = segment_array(nodes["folding"], mrml.FOLDING_SEGMENT_ID, fixed_image)
    np.testing.assert_array_equal(got, jac <= 0)
    display = nodes["folding"].GetDisplayNode()
    assert display.GetVisibility2DFill() and display.GetVisibility()
    transform_display = nodes["transform"].GetDisplayNode()
    assert transform_display.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert transform_display.GetVisibility2D()
    slicer_warped = resample_through(context, moving, nodes["transform"], fixed)
    inside = (slicer_warped != 0) & (sitk.GetArrayFromImage(result.warped) != 0)
    np.testing.assert_allclose(slicer_warped[inside], sitk.GetArrayFromImage(result.warped)[inside], atol=0.1)


def test_propagated_segmentation_equals_engine_labels(engine_run):
    run, result = engine_run, engine_run["result"]
    segmentation = run["nodes"]["segmentation"]
    warped_labels = sitk.GetArrayFromImage(result.warped_labels)
    assert set(np.unique(warped_labels)) == {0, 1, 2}
    source = run["segmentation"].GetSegmentation()
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 2
    for label in (1, 2):
        segment_id = source.GetNthSegmentID(label - 1)
        segment = seg.GetSegment(segment_id)
        assert segment.GetName() == source.GetSegment(segment_id).GetName()
        assert segment.GetColor() == pytest.approx(source.GetSegment(segment_id).GetColor())
        np.testing.assert_array_equal(
            segment_array(segmentation, segment_id, result.warped_labels), warped_labels == label
        )
    labelmap = run["nodes"]["labelmap"]
    np.testing.assert_array_equal(array_of(labelmap), warped_labels)
    table = labelmap.GetDisplayNode().GetColorNode()
    assert [table.GetColorName(i) for i in (1, 2)] == ["Head", "Core"]


def test_inputs_unchanged(engine_run):
    for node in (engine_run["moving"], engine_run["fixed"], engine_run["segmentation"]):
        assert ss.node_checksum(node) == engine_run["before"][node.GetID()], f"{node.GetName()} was modified"


def test_export_segmentation_reads_back_identically(engine_run, tmp_path):
    run, result = engine_run, engine_run["result"]
    segmentation = run["nodes"]["segmentation"]
    path = mrml.export_segmentation(segmentation, tmp_path / "propagated.seg.nrrd")
    loaded = slicer.vtkMRMLSegmentationNode()
    run["context"].scene.AddNode(loaded)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    try:
        assert mrml.segments_of(loaded) == mrml.segments_of(segmentation)
        warped_labels = sitk.GetArrayFromImage(result.warped_labels)
        for info in mrml.segments_of(loaded):
            got = segment_array(loaded, info.segment_id, result.warped_labels)
            np.testing.assert_array_equal(got, warped_labels == info.label)
    finally:
        run["context"].scene.RemoveNode(loaded)

    labelmap_path = mrml.export_segmentation(segmentation, tmp_path / "propagated.nii.gz", result.warped_labels)
    read = sitk.ReadImage(str(labelmap_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(result.warped_labels))
    np.testing.assert_allclose(read.GetDirection(), result.warped_labels.GetDirection(), atol=1e-5)
    default_grid = mrml.export_segmentation(segmentation, tmp_path / "default-grid.nrrd")
    read = sitk.ReadImage(str(default_grid))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(result.warped_labels))
    with pytest.raises(ValueError, match="seg.nrrd"):
        mrml.export_segmentation(segmentation, tmp_path / "labels.txt")


def _scene_summary(scene) -> dict:
    summary = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetHideFromEditors() or node.IsA("vtkMRMLStorageNode") or node.IsA("vtkMRMLSubjectHierarchyNode"):
            continue
        if node.IsA("vtkMRMLColorNode") and node.GetType() != node.User:
            continue
        summary[node.GetName()] = node.GetClassName()
    return summary


def test_result_scene_saved_as_mrb_and_loaded_again(engine_run, tmp_path):
    run, result = engine_run, engine_run["result"]
    moving_image = mrml.volume_to_image(run["moving"])
    fixed_image = mrml.volume_to_image(run["fixed"])
    labels = sitk.GetImageFromArray(run["labels"])
    labels.CopyInformation(moving_image)
    mrb = mrml.save_result_scene(moving_image, fixed_image, result, tmp_path / "out.mrb", moving_labels=labels)
    assert mrb.stat().st_size > 0

    reloaded = ss.headless_scene()
    assert reloaded.scene.ReadFromMRB(str(mrb))
    scene = reloaded.scene
    summary = _scene_summary(scene)
    pair = "moving to fixed"
    for name, cls in {
        "moving": "vtkMRMLScalarVolumeNode",
        "fixed": "vtkMRMLScalarVolumeNode",
        "moving segmentation": "vtkMRMLSegmentationNode",
        f"{pair} DTN transform": "vtkMRMLGridTransformNode",
        "moving warped to fixed": "vtkMRMLScalarVolumeNode",
        f"{pair} Jacobian determinant": "vtkMRMLScalarVolumeNode",
        f"{pair} folding (det J <= 0)": "vtkMRMLSegmentationNode",
        "moving segmentation on fixed": "vtkMRMLSegmentationNode",
        "moving segmentation on fixed label map": "vtkMRMLLabelMapVolumeNode",
        mrml.JACOBIAN_COLOR_NODE_NAME: "vtkMRMLColorTableNode",
    }.items():
        assert summary.get(name) == cls, f"{name} missing from the reloaded scene: {summary}"

    def node(name):
        return scene.GetFirstNodeByName(name)

    transform = node(f"{pair} DTN transform")
    assert mrml.restore_linear_interpolation(scene) == 1  # files do not keep it: read back as cubic
    grid = transform.GetTransformFromParentAs("vtkOrientedGridTransform")
    assert grid.GetInterpolationModeAsString() == "Linear"
    slicer_warped = resample_through(reloaded, node("moving"), transform, node("fixed"))
    same_grid = sitk.GetImageFromArray(slicer_warped)
    mrml.set_image_geometry(same_grid, ss.ijk_to_ras_of(node("fixed")))
    same_grid = sitk.Resample(same_grid, result.warped, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    engine_warped = sitk.GetArrayFromImage(result.warped)
    inside = (sitk.GetArrayFromImage(same_grid) != 0) & (engine_warped != 0)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(same_grid)[inside], engine_warped[inside], atol=1e-3 * engine_warped.max()
    )
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(mrml.grid_transform_to_displacement(transform)),
        sitk.GetArrayFromImage(result.displacement),
        atol=1e-6,
    )
    assert transform.GetDisplayNode().GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    fixed_id = node("fixed").GetID()
    for name in ("moving warped to fixed", f"{pair} Jacobian determinant", "moving segmentation on fixed"):
        assert node(name).GetNodeReferenceID("DTNRegistration.transform") == transform.GetID()
        assert node(name).GetNodeReferenceID("DTNRegistration.fixed") == fixed_id
    jacobian = node(f"{pair} Jacobian determinant")
    assert jacobian.GetDisplayNode().GetColorNode().GetName() == mrml.JACOBIAN_COLOR_NODE_NAME
    # A left-handed volume may come back from file with an axis reversed: compare in physical space.
    for name, expected in (
        ("moving warped to fixed", result.warped),
        (f"{pair} Jacobian determinant", result.jacobian),
    ):
        image = mrml.volume_to_image(node(name))
        same = sitk.Resample(image, expected, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
        np.testing.assert_allclose(sitk.GetArrayFromImage(same), sitk.GetArrayFromImage(expected), atol=1e-5)
    label_table = node("moving segmentation on fixed label map").GetDisplayNode().GetColorNode()
    assert label_table is not None and label_table.GetColorName(1) == "Label 1"
    assert node(f"{pair} folding (det J <= 0)").GetSegmentation().GetSegment(mrml.FOLDING_SEGMENT_ID) is not None


def test_write_scene_from_files(engine_run, tmp_path):
    run, result = engine_run, engine_run["result"]
    sitk.WriteImage(mrml.volume_to_image(run["moving"]), str(tmp_path / "sub-01_T1w.nii.gz"))
    sitk.WriteImage(mrml.volume_to_image(run["fixed"]), str(tmp_path / "atlas.nrrd"))
    labels = sitk.GetImageFromArray(run["labels"].astype(np.int16))
    labels.CopyInformation(mrml.volume_to_image(run["moving"]))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    mrb = mrml.write_scene_from_files(
        tmp_path / "sub-01_T1w.nii.gz", tmp_path / "atlas.nrrd", result, tmp_path / "s.mrb", tmp_path / "labels.nii.gz"
    )
    reloaded = ss.headless_scene()
    assert reloaded.scene.ReadFromMRB(str(mrb))
    summary = _scene_summary(reloaded.scene)
    assert summary["sub-01_T1w warped to atlas"] == "vtkMRMLScalarVolumeNode"
    assert summary["sub-01_T1w to atlas DTN transform"] == "vtkMRMLGridTransformNode"
    assert summary["sub-01_T1w segmentation on atlas"] == "vtkMRMLSegmentationNode"


# ----------------------------------------------------------------------------------------------------------------
# Cancel, failure, bad selections, reused outputs
# ----------------------------------------------------------------------------------------------------------------


def test_cancelled_run_leaves_the_scene_unchanged(context, tiny_model):
    moving, fixed, segmentation, _ = ss.make_test_volumes(context)
    before = ss.node_ids(context.scene)
    checksums = [ss.node_checksum(n) for n in (moving, fixed, segmentation)]
    calls = []

    def cancel_during_refinement():
        calls.append(1)
        return len(calls) > 6  # after a few stages: inside the refinement loop

    logic = mrml.RegistrationLogic(context=context)
    with pytest.raises(registration.Cancelled):
        logic.process(
            moving,
            fixed,
            model=tiny_model,
            device="cpu",
            refine=20,
            moving_segmentation_node=segmentation,
            cancel=cancel_during_refinement,
        )
    assert ss.node_ids(context.scene) == before
    assert [ss.node_checksum(n) for n in (moving, fixed, segmentation)] == checksums
    with pytest.raises(registration.Cancelled):
        logic.process(moving, fixed, model=tiny_model, device="cpu", cancel=lambda: True)
    assert ss.node_ids(context.scene) == before


def test_failing_run_leaves_the_scene_unchanged(context, tmp_path):
    moving, fixed, _, _ = ss.make_test_volumes(context)
    before = ss.node_ids(context.scene)
    logic = mrml.RegistrationLogic(context=context)
    with pytest.raises(ValueError, match="weights file not found|unknown model"):
        logic.process(moving, fixed, model=str(tmp_path / "missing.safetensors"), device="cpu")
    assert ss.node_ids(context.scene) == before
    # A failure while building the nodes removes the ones already created.
    fixed_image = mrml.volume_to_image(fixed)
    broken = synthetic_result(mrml.volume_to_image(moving), fixed_image)
    broken.jacobian = sitk.Image([2, 2], sitk.sitkFloat32)  # not 3-D: fails after the transform and warped nodes
    job = mrml.RegistrationJob(moving=None, fixed=fixed_image, node_ids={"fixed": fixed.GetID()})
    with pytest.raises(ValueError):
        logic.build(job, broken)
    assert ss.node_ids(context.scene) == before


def test_bad_selections_give_clear_errors(context):
    moving, fixed, segmentation, _ = ss.make_test_volumes(context)
    logic = mrml.RegistrationLogic(context=context)
    flat = ss.add_volume_from_array(context, np.ones((1, 20, 20), np.float32), np.eye(4), "slice")
    thin = ss.add_volume_from_array(context, np.ones((3, 20, 20), np.float32), np.eye(4), "thin")
    label = ss.add_volume_from_array(context, np.ones((8, 8, 8), np.uint8), np.eye(4), "labels", labelmap=True)
    empty = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    before = ss.node_ids(context.scene)
    cases = [
        (dict(moving_node=None, fixed_node=fixed), "Select a moving volume"),
        (dict(moving_node=moving, fixed_node=None), "Select a fixed volume"),
        (dict(moving_node=moving, fixed_node=moving), "both the moving and the fixed"),
        (dict(moving_node=flat, fixed_node=fixed), "2-D"),
        (dict(moving_node=moving, fixed_node=thin), "too thin"),
        (dict(moving_node=label, fixed_node=fixed), "label map"),
        (dict(moving_node=moving, fixed_node=fixed, moving_segmentation_node=empty), "no segments"),
        (dict(moving_node=moving, fixed_node=fixed, mask_node=empty), "no segments"),
        (dict(moving_node=moving, fixed_node=fixed, alpha=-1.0), "alpha"),
        (dict(moving_node=moving, fixed_node=fixed, device="tpu"), "unknown device"),
        (
            dict(moving_node=moving, fixed_node=fixed, outputs=mrml.OutputNodes(warped=moving)),
            "is one of the inputs",
        ),
        (
            dict(
                moving_node=moving,
                fixed_node=fixed,
                moving_segmentation_node=segmentation,
                outputs=mrml.OutputNodes(segmentation=segmentation),
            ),
            "is one of the inputs",
        ),
        (
            dict(moving_node=moving, fixed_node=fixed, outputs=mrml.OutputNodes(jacobian=label)),
            "vtkMRMLScalarVolumeNode is needed",
        ),
    ]
    for kwargs, message in cases:
        moving_node, fixed_node = kwargs.pop("moving_node"), kwargs.pop("fixed_node")
        with pytest.raises(ValueError, match=message):
            logic.process(moving_node, fixed_node, **kwargs)
    assert ss.node_ids(context.scene) == before


def test_mask_from_segmentation_and_label_map(context):
    moving, fixed, segmentation, _ = ss.make_test_volumes(context)
    fixed_image = mrml.volume_to_image(fixed)
    mask = mrml.mask_to_image(segmentation, fixed, fixed_image, context)
    assert mask.GetSize() == fixed_image.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(mask.GetDirection(), fixed_image.GetDirection())
    expected = sitk.Resample(
        mrml.volume_to_image(moving) > 30, fixed_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    agreement = (sitk.GetArrayFromImage(mask) > 0) == (sitk.GetArrayFromImage(expected) > 0)
    assert agreement.mean() > 0.97
    label = ss.add_volume_from_array(
        context,
        (ss.phantom(ss.ras_grid(ss.FIXED_SIZE, ss.FIXED_IJK_TO_RAS)) > 30).astype(np.uint8),
        ss.FIXED_IJK_TO_RAS,
        "mask",
        labelmap=True,
    )
    mask = mrml.mask_to_image(label, fixed, fixed_image, context)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), array_of(label))


def test_existing_output_nodes_are_reused(context):
    moving, fixed, _, _ = ss.make_test_volumes(context)
    fixed_image = mrml.volume_to_image(fixed)
    result = synthetic_result(mrml.volume_to_image(moving), fixed_image)
    outputs = mrml.OutputNodes(
        transform=context.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my transform"),
        warped=context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped"),
    )
    job = mrml.RegistrationJob(moving=None, fixed=fixed_image, node_ids={"fixed": fixed.GetID()})
    logic = mrml.RegistrationLogic(context=context)
    nodes = logic.build(job, result, outputs)
    assert nodes["transform"] is outputs.transform and nodes["warped"] is outputs.warped
    assert nodes["warped"].GetName() == "my warped"
    np.testing.assert_array_equal(array_of(nodes["warped"]), sitk.GetArrayFromImage(result.warped))
    count = context.scene.GetNumberOfNodes()
    logic.build(job, result, outputs)  # a second run into the same nodes adds only new jacobian/folding
    added = context.scene.GetNumberOfNodes() - count
    assert added == 4  # jacobian + display, folding + display; the colour table is shared


def test_status_line(engine_run):
    line = mrml.status_line(engine_run["result"])
    assert "Folding voxels (det J <= 0):" in line and "device: cpu" in line and " s" in line


def test_render_slice_shows_layers_without_opengl(engine_run):
    run = engine_run
    context, nodes = run["context"], run["nodes"]
    before = ss.node_ids(context.scene)
    grey = mrml.render_slice(context, run["fixed"], size=(96, 80))
    assert grey.shape == (80, 96, 4) and grey.dtype == np.uint8
    assert grey[..., :3].max() > 100
    assert np.array_equal(grey[..., 0], grey[..., 1]), "a grey volume renders grey"
    blended = mrml.render_slice(context, run["fixed"], foreground=nodes["warped"], label=nodes["labelmap"])
    labelled = np.abs(blended[..., 0].astype(int) - blended[..., 2].astype(int)) > 20
    assert labelled.mean() > 0.02, "the label map layer shows in colour"
    jacobian = mrml.render_slice(context, nodes["jacobian"])
    assert np.abs(jacobian[..., 0].astype(int) - jacobian[..., 2].astype(int)).max() > 0, "det J uses its colours"
    assert ss.node_ids(context.scene) == before, "rendering must not leave nodes behind"


def test_scene_for_the_command_line_from_images(engine_run, tmp_path):
    """dtnreg calls write_scene_from_files with SimpleITK images; the bundle has a preview image."""
    import zipfile

    run, result = engine_run, engine_run["result"]
    moving_image = mrml.volume_to_image(run["moving"])
    labels = sitk.GetImageFromArray(run["labels"].astype(np.int32))
    labels.CopyInformation(moving_image)
    mrb = mrml.write_scene_from_files(
        moving_image, mrml.volume_to_image(run["fixed"]), result, tmp_path / "cli.mrb", labels
    )
    names = zipfile.ZipFile(mrb).namelist()
    assert any(name.endswith(".png") for name in names), names
    reloaded = ss.headless_scene()
    assert reloaded.scene.ReadFromMRB(str(mrb))
    summary = _scene_summary(reloaded.scene)
    assert summary["moving warped to fixed"] == "vtkMRMLScalarVolumeNode"
    assert summary["moving segmentation on fixed"] == "vtkMRMLSegmentationNode"


def test_a_headless_scene_removes_its_temporary_cache_folder():
    import gc
    from pathlib import Path

    context = mrml.create_headless_scene()
    folder = Path(context.keep_alive[0].GetRemoteCacheDirectory())
    assert folder.is_dir() and folder.name.startswith("dtnreg-cache-")
    del context
    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize("stem", ["fixed_icbm2009a_tissue_2mm", "moving_itk_head_tissue"])
def test_sample_segmentations_name_the_tissues_and_match_the_label_maps(context, stem):
    """Slicer's Sample Data loads the .seg.nrrd: named segments, the same voxels as the label map beside it."""
    samples = Path(__file__).resolve().parents[1] / "DTNRegistration" / "Resources" / "Samples"
    labels = sitk.ReadImage(str(samples / f"{stem}.nii.gz"))
    loaded = slicer.vtkMRMLSegmentationNode()
    context.scene.AddNode(loaded)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(samples / f"{stem}.seg.nrrd"))
    try:
        assert storage.ReadData(loaded)
        assert [s.name for s in mrml.segments_of(loaded)] == ["CSF", "Grey matter", "White matter"]
        again = mrml.segmentation_labels_on(loaded, labels)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(labels))
    finally:
        context.scene.RemoveNode(loaded)


# ----------------------------------------------------------------------------------------------------------------
# Issue 10: a moving volume under a linear transform; output nodes reused without piling up
# ----------------------------------------------------------------------------------------------------------------


def _rotation_about_s(context, angle: float, shift) -> object:
    node = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "L")
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s, 0, shift[0]], [s, c, 0, shift[1]], [0, 0, 1, shift[2]], [0, 0, 0, 1]])
    node.SetMatrixTransformToParent(mrml.geometry.matrix_from_array(matrix))
    return node


def _resample_to(context, node, fixed_node) -> np.ndarray:
    """Slicer's resampling of ``node`` (through all its parent transforms) onto the fixed grid."""
    out = context.volumes_logic.ResampleVolumeToReferenceVolume(node, fixed_node)
    array = sitk.GetArrayFromImage(mrml.volume_to_image(out, world=False))
    context.scene.RemoveNode(out)
    return array


def test_moving_volume_under_a_linear_transform_is_shown_registered_with_it_kept(context):
    """The engine folds L into the moving image; showing the result must keep L (moving -> L -> result)."""
    moving, fixed, _, _ = ss.make_test_volumes(context)
    linear = _rotation_about_s(context, 0.25, (4.0, -3.0, 2.0))
    moving.SetAndObserveTransformNodeID(linear.GetID())
    moving_image = mrml.volume_to_image(moving)  # world geometry: L folded in, as the runner writes it
    assert not np.allclose(moving_image.GetOrigin(), mrml.volume_to_image(moving, world=False).GetOrigin())
    result = synthetic_result(moving_image, mrml.volume_to_image(fixed), amplitude=1.0)
    job = mrml.RegistrationJob(moving=moving_image, fixed=None, node_ids={"fixed": fixed.GetID()})
    nodes = mrml.RegistrationLogic(context=context).build(job, result)
    transform = nodes["transform"]
    engine_warped = sitk.GetArrayFromImage(result.warped)
    inside = engine_warped != 0
    tolerance = 1e-3 * engine_warped.max()

    # What the old help text said: the moving volume straight under the result. L is dropped: misaligned.
    moving.SetAndObserveTransformNodeID(transform.GetID())
    dropped = _resample_to(context, moving, fixed)
    assert np.abs(dropped[inside] - engine_warped[inside]).max() > 100 * tolerance
    moving.SetAndObserveTransformNodeID(linear.GetID())

    message = mrml.place_under_transform(moving, transform)
    assert moving.GetParentTransformNode() is linear and linear.GetParentTransformNode() is transform
    assert "'L'" in message and "keeps it" in message
    matrix = vtk.vtkMatrix4x4()
    linear.GetMatrixTransformToParent(matrix)
    assert matrix.GetElement(0, 3) == 4.0, "L's own matrix is unchanged"
    shown = _resample_to(context, moving, fixed)
    both = inside & (shown != 0)
    assert both.mean() > 0.3
    np.testing.assert_allclose(shown[both], engine_warped[both], atol=tolerance)
    assert "already" in mrml.place_under_transform(moving, transform)


def test_place_under_transform_without_parent_and_refusing_nonlinear(context):
    moving, fixed, _, _ = ss.make_test_volumes(context)
    grid = context.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "result")
    assert mrml.place_under_transform(moving, grid) == "'moving' is now under 'result'"
    assert moving.GetParentTransformNode() is grid
    other = context.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "other")
    fixed.SetAndObserveTransformNodeID(other.GetID())
    other.SetAndObserveTransformFromParent(
        mrml.displacement_to_grid_transform(sitk.Image([4, 4, 4], sitk.sitkVectorFloat64))
    )
    with pytest.raises(ValueError, match="non-linear transform 'other'"):
        mrml.place_under_transform(fixed, grid)


def test_overwriting_every_output_adds_no_node(context):
    """Output selectors pointing at existing nodes: a second run reuses them, label map and colour table too."""
    moving, fixed, segmentation, labels = ss.make_test_volumes(context)
    moving_image, fixed_image = mrml.volume_to_image(moving), mrml.volume_to_image(fixed)
    labels_image = sitk.GetImageFromArray(labels.astype(np.uint16))
    labels_image.CopyInformation(moving_image)
    result = synthetic_result(moving_image, fixed_image, labels=labels_image)
    job = mrml.RegistrationJob(
        moving=moving_image,
        fixed=fixed_image,
        segments=mrml.segments_of(segmentation),
        node_ids={"fixed": fixed.GetID(), "moving": moving.GetID()},
    )
    logic = mrml.RegistrationLogic(context=context)
    first = logic.build(job, result)
    outputs = mrml.OutputNodes(
        transform=first["transform"],
        warped=first["warped"],
        jacobian=first["jacobian"],
        folding=first["folding"],
        segmentation=first["segmentation"],
    )
    before = ss.node_ids(context.scene)
    second = logic.build(job, result, outputs)
    assert ss.node_ids(context.scene) == before, "a run into existing outputs must not add nodes"
    assert second["labelmap"] is first["labelmap"]
    table = second["labelmap"].GetDisplayNode().GetColorNode()
    assert table.GetAttribute("DTNRegistration.role") == "label-colors" and table.GetColorName(1) == "Head"
