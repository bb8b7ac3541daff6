"""A registration result -> MRML nodes: grid transform, warped volume, det J, folding overlay, segmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import SimpleITK as sitk  # noqa: N813
import slicer

from .colors import JACOBIAN_WINDOW, jacobian_color_table, label_color_table
from .geometry import oriented_image_from_image, update_volume_from_image
from .grid_transform import displacement_to_grid_transform
from .job import OutputNodes, RegistrationJob
from .scene import ROLE_PREFIX, SceneContext, node_ids, remove_nodes_added_since
from .segmentations import SegmentInfo, add_segments_from_labels

FOLDING_SEGMENT_ID = "folding"
FOLDING_SEGMENT_NAME = "Folding (det J <= 0)"
FOLDING_COLOR = (1.0, 0.0, 0.0)
LABELMAP_REFERENCE = ROLE_PREFIX + "labelmap"  # from a propagated segmentation to its label map


def build_result_nodes(
    context: SceneContext,
    job: RegistrationJob,
    result,
    outputs: OutputNodes | None = None,
    fixed_node=None,
    moving_node=None,
) -> dict[str, Any]:
    """Create (or overwrite) the nodes of a registration result; returns them by role.

    Roles: ``transform`` (grid transform, FromParent, grid display in slice views), ``warped`` (the moving
    volume on the fixed grid), ``jacobian`` (det J with a colour table), ``folding`` (segmentation of the
    det J <= 0 voxels, red, on the fixed volume), and with a moving segmentation ``segmentation`` (the
    propagated one, segment names and colours kept) and ``labelmap``. If anything fails, the nodes this call
    created are removed again.
    """
    scene = context.scene
    outputs = outputs or OutputNodes()
    ids_before = node_ids(scene)
    pair = f"{job.moving_name} to {job.fixed_name}"
    scene.StartState(scene.BatchProcessState)
    try:
        transform_node = _new_or_existing(scene, outputs.transform, "vtkMRMLGridTransformNode", f"{pair} DTN transform")
        transform_node.SetAndObserveTransformFromParent(displacement_to_grid_transform(result.displacement))
        _annotate_transform(transform_node, result)
        _set_references(transform_node, job)
        _grid_display(transform_node, fixed_node)

        warped = _new_or_existing(
            scene, outputs.warped, "vtkMRMLScalarVolumeNode", f"{job.moving_name} warped to {job.fixed_name}"
        )
        _set_volume(scene, warped, result.warped)
        _copy_window_level(moving_node, warped)
        _set_references(warped, job, transform_node)

        jacobian = _new_or_existing(scene, outputs.jacobian, "vtkMRMLScalarVolumeNode", f"{pair} Jacobian determinant")
        _set_volume(scene, jacobian, result.jacobian)
        _jacobian_display(scene, jacobian)
        _set_references(jacobian, job, transform_node)

        folding = _new_or_existing(scene, outputs.folding, "vtkMRMLSegmentationNode", f"{pair} folding (det J <= 0)")
        folding_segment = SegmentInfo(1, FOLDING_SEGMENT_NAME, FOLDING_COLOR, FOLDING_SEGMENT_ID)
        fill_segmentation(folding, result.folding, [folding_segment], fixed_node)
        folding.SetAttribute(ROLE_PREFIX + "folding_count", str(int(result.metrics.get("folding_count", 0))))
        _set_references(folding, job, transform_node)
        nodes = {"transform": transform_node, "warped": warped, "jacobian": jacobian, "folding": folding}

        if result.warped_labels is not None and job.segments:
            on_fixed = f"{job.segmentation_name} on {job.fixed_name}"
            segmentation = _new_or_existing(scene, outputs.segmentation, "vtkMRMLSegmentationNode", on_fixed)
            fill_segmentation(segmentation, result.warped_labels, job.segments, fixed_node)
            _set_references(segmentation, job, transform_node)
            nodes["segmentation"] = segmentation
            if outputs.create_labelmap or outputs.labelmap is not None:
                # An output segmentation that is overwritten brings its label map (and that map's colour table)
                # along, instead of a new pair of nodes at every run.
                existing = outputs.labelmap or _referenced(
                    segmentation, LABELMAP_REFERENCE, "vtkMRMLLabelMapVolumeNode"
                )
                labelmap = _new_or_existing(scene, existing, "vtkMRMLLabelMapVolumeNode", f"{on_fixed} label map")
                _set_label_map(scene, labelmap, result.warped_labels, job)
                _set_references(labelmap, job, transform_node)
                segmentation.SetNodeReferenceID(LABELMAP_REFERENCE, labelmap.GetID())
                nodes["labelmap"] = labelmap
    except Exception:
        remove_nodes_added_since(scene, ids_before)  # with their display and storage nodes and colour tables
        raise
    finally:
        scene.EndState(scene.BatchProcessState)
    return nodes


def add_volume_node(context: SceneContext, image: sitk.Image, name: str, labelmap: bool = False):
    """Add a volume node holding a SimpleITK image (with display) to the context's scene."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = context.scene.AddNewNodeByClass(cls, name)
    update_volume_from_image(node, image)
    display = display_node_of(node)
    if not labelmap and display is not None:
        _show_in_grey(context.scene, display)
        display.SetAutoWindowLevel(True)
    return node


def fill_segmentation(node, labels: sitk.Image, segments: Sequence[SegmentInfo], reference_node) -> None:
    """Replace a segmentation's segments by those of a label map, shown filled and outlined in slice views.

    The reference geometry is ``reference_node``'s, or without one the label map's own grid.
    """
    node.GetSegmentation().RemoveAllSegments()
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    else:
        node.SetReferenceImageGeometryParameterFromVolumeNode(None)
        geometry = oriented_image_from_image(labels)
        node.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry),
        )
    add_segments_from_labels(node, labels, segments)
    display = display_node_of(node)
    display.SetVisibility(True)
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)


def display_node_of(node):
    """The node's display node, created with Slicer's defaults where it has none."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node.GetDisplayNode()


def _new_or_existing(scene, existing, cls_name: str, name: str):
    if existing is not None:
        return existing
    return scene.AddNewNodeByClass(cls_name, scene.GenerateUniqueName(name))


def _referenced(node, role: str, class_name: str):
    """The node ``node`` references under ``role``, if it is still in the scene and of ``class_name``."""
    target = node.GetNodeReference(role)
    scene = node.GetScene()
    if target is None or scene is None or not scene.IsNodePresent(target) or not target.IsA(class_name):
        return None
    return target


def _set_references(node, job: RegistrationJob, transform_node=None) -> None:
    """Point a result node at its inputs (and at the transform that made it), for the GUI and scripts."""
    for role in ("moving", "fixed"):
        node_id = job.node_ids.get(role)
        if node_id:
            node.SetNodeReferenceID(ROLE_PREFIX + role, node_id)
    if transform_node is not None and node is not transform_node:
        node.SetNodeReferenceID(ROLE_PREFIX + "transform", transform_node.GetID())


def _set_volume(scene, node, image: sitk.Image) -> None:
    update_volume_from_image(node, image)
    display = display_node_of(node)
    if display is not None and not display.GetColorNodeID():
        _show_in_grey(scene, display)


def _show_in_grey(scene, display) -> None:
    grey = scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
    if grey is not None:
        display.SetAndObserveColorNodeID(grey.GetID())


def _jacobian_display(scene, jacobian) -> None:
    """det J through its diverging colour table, over a fixed window (comparable between results)."""
    display = jacobian.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobian_color_table(scene).GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(*JACOBIAN_WINDOW)


def _set_label_map(scene, labelmap, labels: sitk.Image, job: RegistrationJob) -> None:
    """The propagated labels with a colour table of the segments' names and colours (reused when overwriting)."""
    update_volume_from_image(labelmap, sitk.Cast(labels, sitk.sitkUInt16))
    display = display_node_of(labelmap)
    table = label_color_table(scene, f"{job.segmentation_name} labels", job.segments, display.GetColorNode())
    display.SetAndObserveColorNodeID(table.GetID())


def _annotate_transform(node, result) -> None:
    """Record how the transform was made (model, alpha, device, folding, time) as node attributes."""
    metrics = result.metrics
    node.SetAttribute(ROLE_PREFIX + "alpha", f"{float(result.alpha):g}")
    node.SetAttribute(ROLE_PREFIX + "device", str(result.device))
    node.SetAttribute(ROLE_PREFIX + "model", str(result.model.get("name", "")))
    node.SetAttribute(ROLE_PREFIX + "model_sha256", str(result.model.get("sha256", "")))
    node.SetAttribute(ROLE_PREFIX + "folding_count", str(int(metrics.get("folding_count", 0))))
    node.SetAttribute(ROLE_PREFIX + "folding_percent", f"{float(metrics.get('folding_percent', 0.0)):.6g}")
    if "sd_log_jacobian" in metrics:
        node.SetAttribute(ROLE_PREFIX + "sd_log_jacobian", f"{float(metrics['sd_log_jacobian']):.6g}")
    node.SetAttribute(ROLE_PREFIX + "time_s", f"{float(result.timings.get('total', 0.0)):.3f}")


def _grid_display(transform_node, fixed_node) -> None:
    """Show the transform as a deformed grid in the slice views (over the fixed volume's region)."""
    display = display_node_of(transform_node)
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    if fixed_node is not None:
        display.SetAndObserveRegionNode(fixed_node)
    display.SetVisibility2D(True)
    display.SetVisibility3D(False)
    display.SetVisibility(True)


def _copy_window_level(source, target) -> None:
    """The warped volume looks like the moving one: same colours and window/level."""
    if source is None or source.GetDisplayNode() is None or target.GetDisplayNode() is None:
        return
    src, dst = source.GetDisplayNode(), target.GetDisplayNode()
    if src.GetColorNodeID():
        dst.SetAndObserveColorNodeID(src.GetColorNodeID())
    dst.SetAutoWindowLevel(src.GetAutoWindowLevel())
    if not src.GetAutoWindowLevel():
        dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
