"""Slicer glue of the engine: MRML nodes <-> SimpleITK images, and a registration result -> MRML nodes.

The only engine module that imports ``slicer``. It runs the same inside the Slicer application and headless
with ``slicer-core`` (``pip install slicer-core``): everything it needs from Slicer is handed to it as a
:class:`SceneContext` (a scene and the module logics), which defaults to Slicer's own inside the application.

Geometry (the one place where RAS and LPS meet):

* A volume node stores voxels in a ``vtkImageData`` (index ``i`` fastest) and its geometry in its
  IJK-to-RAS matrix ``M``: ``RAS = M @ (i, j, k, 1)``. A SimpleITK image stores ``LPS = origin + D @ diag(s)
  @ (i, j, k)``. With ``F = diag(-1, -1, 1)`` (its own inverse), ``M[:3, :3] = F @ D @ diag(s)`` and
  ``M[:3, 3] = F @ origin``. No axis is ever flipped or permuted: oblique and left-handed IJK-to-RAS
  matrices come through exactly, whatever the array orientation.
* A displacement field (ITK convention: vectors in LPS mm on the fixed grid, ``warped(x) = moving(x + u(x))``)
  becomes a ``vtkOrientedGridTransform`` set *FromParent* on a ``vtkMRMLGridTransformNode``: grid origin,
  spacing and direction in RAS, vectors in RAS (x and y negated), linear interpolation, so that Slicer's
  resampling of the moving volume through the node reproduces the engine's warped image.
* Linear parent transforms of the inputs are taken into account (the images are registered in world
  coordinates); non-linear ones must be hardened first.

The :class:`RegistrationLogic` splits a run into ``prepare`` (main thread: read the nodes, validate),
``compute`` (any thread: the engine only, no MRML) and ``build`` (main thread: create the nodes), so that a
cancelled or failed computation leaves the scene exactly as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk  # noqa: N813
import slicer
import vtk
from vtk.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # also RAS -> LPS: its own inverse
ROLE_PREFIX = "DTNRegistration."
FOLDING_SEGMENT_ID = "folding"
FOLDING_SEGMENT_NAME = "Folding (det J <= 0)"
FOLDING_COLOR = (1.0, 0.0, 0.0)
JACOBIAN_COLOR_NODE_NAME = "DTN Jacobian determinant"
JACOBIAN_WINDOW = (0.0, 2.0)  # det J shown from 0 (full compression) through 1 (none) to 2 (doubling)
SEGMENTATION_EXTENSIONS = (".seg.nrrd", ".seg.nhdr")
LABELMAP_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")

# A palette for label maps that come without names or colours (e.g. from the command line).
_PALETTE = (
    (0.90, 0.60, 0.00),
    (0.35, 0.70, 0.90),
    (0.00, 0.60, 0.50),
    (0.95, 0.90, 0.25),
    (0.00, 0.45, 0.70),
    (0.80, 0.40, 0.00),
    (0.80, 0.60, 0.70),
    (0.50, 0.80, 0.30),
)


# ----------------------------------------------------------------------------------------------------------------
# Scene and module logics
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SceneContext:
    """A scene with the module logics this module uses (Slicer's own inside the app, or headless ones)."""

    scene: Any
    volumes_logic: Any = None
    segmentations_logic: Any = None
    transforms_logic: Any = None
    application_logic: Any = None
    keep_alive: list = field(default_factory=list, repr=False)


def app_context() -> SceneContext:
    """The running Slicer application's scene and logics (only inside the Slicer app)."""
    modules = slicer.modules
    return SceneContext(
        scene=slicer.mrmlScene,
        volumes_logic=modules.volumes.logic(),
        segmentations_logic=modules.segmentations.logic(),
        transforms_logic=modules.transforms.logic(),
        application_logic=slicer.app.applicationLogic(),
    )


def create_headless_scene(cache_dir: str | os.PathLike | None = None) -> SceneContext:
    """A scene that behaves like Slicer's, without the application (slicer-core).

    A cache manager and a data I/O manager (needed to read .mrb), an application logic with a colour logic
    registered as "Colors" (volume loading needs it), and the Volumes, Transforms, Segmentations and
    SubjectHierarchy logics, each registered with the application logic under its module name.
    """
    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir or tempfile.mkdtemp(prefix="dtnreg-cache-")))
    scene.SetCacheManager(cache)
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    scene.SetDataIOManager(io_manager)
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    app.SetColorLogic(colors)
    app.SetModuleLogic("Colors", colors)
    logics = {}
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Transforms", slicer.vtkSlicerTransformLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    return SceneContext(
        scene=scene,
        volumes_logic=logics["Volumes"],
        segmentations_logic=logics["Segmentations"],
        transforms_logic=logics["Transforms"],
        application_logic=app,
        keep_alive=[cache, io_manager, colors, logics["SubjectHierarchy"]],
    )


# ----------------------------------------------------------------------------------------------------------------
# Geometry: IJK-to-RAS <-> SimpleITK origin/spacing/direction
# ----------------------------------------------------------------------------------------------------------------


def _array_from_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def image_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a 3-D SimpleITK image's grid."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    return matrix


def set_image_geometry(image: sitk.Image, ijk_to_ras: np.ndarray) -> sitk.Image:
    """Give ``image`` the grid of a 4x4 IJK-to-RAS matrix (spacing = column norms); returns ``image``."""
    linear = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"degenerate IJK-to-RAS matrix (a zero column): {ijk_to_ras.tolist()}")
    direction = LPS_TO_RAS @ linear / spacing
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)[:3, 3]])
    return image


def node_ijk_to_world(node, what: str = "volume") -> np.ndarray:
    """IJK-to-RAS of a volume node in world coordinates: its own matrix, after any *linear* parent transform."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _array_from_matrix(matrix)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(
                f"{what} '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                "harden the transform on it first (Data module, right-click, Harden transform)"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _array_from_matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def _numpy_from_image_data(image_data: vtk.vtkImageData) -> np.ndarray:
    """Voxels of a vtkImageData as a (K, J, I) or (K, J, I, C) numpy array (a copy)."""
    dims = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    if scalars is None:
        raise ValueError("the image has no voxels")
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars).copy()
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return array.reshape(shape)


def _image_data_from_numpy(array: np.ndarray, components: int = 1) -> vtk.vtkImageData:
    """A vtkImageData (origin 0, spacing 1) holding ``array`` (K, J, I[, C]); voxels are copied."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.int64:
        array = array.astype(np.int32)
    elif array.dtype == np.uint64:
        array = array.astype(np.uint32)
    array = np.ascontiguousarray(array)
    shape = array.shape[:3]
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(shape[2], shape[1], shape[0])
    flat = array.reshape(-1, components) if components > 1 else array.ravel()
    vtk_array = numpy_support.numpy_to_vtk(flat, deep=True)
    vtk_array.SetNumberOfComponents(components)
    image_data.GetPointData().SetScalars(vtk_array)
    return image_data


def _image_from_oriented(voxels: np.ndarray, ijk_to_ras: np.ndarray, extent_start: Sequence[int]) -> sitk.Image:
    """A SimpleITK image from (K, J, I) voxels whose first voxel sits at IJK ``extent_start``."""
    image = sitk.GetImageFromArray(voxels)
    matrix = np.array(ijk_to_ras, dtype=np.float64)
    matrix[:3, 3] = (matrix @ np.array([*extent_start, 1.0]))[:3]
    return set_image_geometry(image, matrix)


def volume_to_image(node, what: str = "volume", world: bool = True) -> sitk.Image:
    """A scalar volume node as a 3-D SimpleITK image (a copy), geometry from its IJK-to-RAS.

    With ``world`` (default), a linear parent transform is applied to the geometry.
    """
    if node is None:
        raise ValueError(f"no {what} selected")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError(f"{what} '{node.GetName()}' is a {node.GetClassName()}; a scalar volume is needed")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"{what} '{node.GetName()}' has no voxels")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"{what} '{node.GetName()}' has several components per voxel; a scalar volume is needed")
    ijk_to_ras = node_ijk_to_world(node, what) if world else _node_ijk_to_ras(node)
    extent = image_data.GetExtent()
    return _image_from_oriented(_numpy_from_image_data(image_data), ijk_to_ras, extent[0::2])


def _node_ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _array_from_matrix(matrix)


def update_volume_from_image(node, image: sitk.Image):
    """Set a volume node's voxels and IJK-to-RAS from a 3-D SimpleITK image (scalar or vector); returns node."""
    if image.GetDimension() != 3:
        raise ValueError(f"a 3-D image is needed, got {image.GetDimension()}-D")
    components = image.GetNumberOfComponentsPerPixel()
    image_data = _image_data_from_numpy(sitk.GetArrayFromImage(image), components)
    node.SetIJKToRASMatrix(_matrix_from_array(image_ijk_to_ras(image)))
    node.SetAndObserveImageData(image_data)
    return node


def oriented_image_from_image(image: sitk.Image):
    """A ``vtkOrientedImageData`` (the segmentations' labelmap type) from a 3-D SimpleITK image."""
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(_image_data_from_numpy(sitk.GetArrayFromImage(image)))
    oriented.SetImageToWorldMatrix(_matrix_from_array(image_ijk_to_ras(image)))
    return oriented


def image_from_oriented_image(oriented) -> sitk.Image:
    """A SimpleITK image from a ``vtkOrientedImageData`` (any extent)."""
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    extent = oriented.GetExtent()
    return _image_from_oriented(_numpy_from_image_data(oriented), _array_from_matrix(matrix), extent[0::2])


# ----------------------------------------------------------------------------------------------------------------
# Displacement field <-> grid transform
# ----------------------------------------------------------------------------------------------------------------


def displacement_to_grid_transform(displacement: sitk.Image):
    """An ITK displacement field (LPS mm, fixed grid) as a ``vtkOrientedGridTransform`` in RAS.

    Set it *FromParent* on a grid transform node: a point ``x`` (RAS) of the fixed image maps to
    ``x + u(x)`` in the moving image, which is how Slicer resamples the moving volume.
    """
    if displacement.GetNumberOfComponentsPerPixel() != 3 or displacement.GetDimension() != 3:
        raise ValueError("a 3-D displacement field with 3 components is needed")
    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)  # (K, J, I, 3), LPS
    vectors[..., :2] *= -1.0  # LPS -> RAS
    grid = _image_data_from_numpy(vectors, components=3)
    ijk_to_ras = image_ijk_to_ras(displacement)
    spacing = np.array(displacement.GetSpacing())
    grid.SetOrigin(*ijk_to_ras[:3, 3])
    grid.SetSpacing(*spacing)
    direction = np.eye(4)
    direction[:3, :3] = ijk_to_ras[:3, :3] / spacing
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(_matrix_from_array(direction))
    transform.SetDisplacementScale(1.0)
    transform.SetDisplacementShift(0.0)
    transform.SetInterpolationModeToLinear()
    return transform


def restore_linear_interpolation(scene) -> int:
    """Set linear interpolation again on this module's grid transforms; returns how many were reset.

    Transform files do not store the interpolation mode and a grid transform read from file comes back cubic,
    which no longer reproduces the engine's (trilinear) warped image exactly. Call after loading a scene.
    """
    count = 0
    for node in _nodes_of(scene, "vtkMRMLGridTransformNode"):
        if node.GetAttribute(ROLE_PREFIX + "alpha") is None:  # not made by DTN Registration
            continue
        transform = node.GetTransformFromParentAs("vtkOrientedGridTransform")
        if transform is not None and transform.GetInterpolationMode() != vtk.VTK_LINEAR_INTERPOLATION:
            transform.SetInterpolationModeToLinear()
            node.SetAndObserveTransformFromParent(transform)
            count += 1
    return count


def grid_transform_to_displacement(transform_node) -> sitk.Image:
    """The FromParent displacement grid of a grid transform node back as an ITK field (LPS mm)."""
    transform = transform_node.GetTransformFromParentAs("vtkOrientedGridTransform")
    if transform is None:
        raise ValueError(f"'{transform_node.GetName()}' holds no grid transform in the FromParent direction")
    grid = transform.GetDisplacementGrid()
    vectors = _numpy_from_image_data(grid).astype(np.float64)
    vectors = vectors * transform.GetDisplacementScale() + transform.GetDisplacementShift()
    vectors[..., :2] *= -1.0  # RAS -> LPS
    image = sitk.GetImageFromArray(vectors, isVector=True)
    matrix = np.eye(4)
    direction_matrix = transform.GetGridDirectionMatrix()
    direction = _array_from_matrix(direction_matrix)[:3, :3] if direction_matrix is not None else np.eye(3)
    matrix[:3, :3] = direction @ np.diag(grid.GetSpacing())
    matrix[:3, 3] = grid.GetOrigin()
    return set_image_geometry(image, matrix)


# ----------------------------------------------------------------------------------------------------------------
# Segmentations <-> label maps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentInfo:
    """A segment carried through the registration as one label value of a label map."""

    label: int
    name: str
    color: tuple[float, float, float]
    segment_id: str = ""


def segments_of(segmentation_node) -> list[SegmentInfo]:
    """The segments of a segmentation node, labelled 1..n in their order."""
    segmentation = segmentation_node.GetSegmentation()
    infos = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        infos.append(SegmentInfo(index + 1, segment.GetName(), tuple(segment.GetColor()), segment_id))
    return infos


def segmentation_to_labels(segmentation_node, reference_node, reference_image: sitk.Image, context: SceneContext):
    """A segmentation as a label map on ``reference_node``'s voxel grid: ``(labels, segments)``.

    Segment n (in the segmentation's order) gets label n; where segments overlap, the later one wins.
    ``reference_image`` is ``reference_node`` as converted by :func:`volume_to_image`; the labels get its
    geometry (world coordinates). Nothing is added to the scene.
    """
    segments = segments_of(segmentation_node)
    if not segments:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segments")
    ids = vtk.vtkStringArray()
    values = vtk.vtkIntArray()
    for info in segments:
        ids.InsertNextValue(info.segment_id)
        values.InsertNextValue(info.label)
    merged = slicer.vtkOrientedImageData()
    logic = context.segmentations_logic or slicer.vtkSlicerSegmentationsModuleLogic
    logic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, reference_node, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged, values
    )
    labels = image_from_oriented_image(merged)  # in the reference node's own (untransformed) frame
    if labels.GetSize() != reference_image.GetSize():  # another extent than the reference's: onto its grid
        local_reference = set_image_geometry(sitk.Image(reference_image), _node_ijk_to_ras(reference_node))
        labels = sitk.Resample(labels, local_reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(labels).astype(np.uint16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference_image)
    return out, segments


def mask_to_image(mask_node, fixed_node, fixed_image: sitk.Image, context: SceneContext) -> sitk.Image:
    """A mask (label map, scalar volume or segmentation) as a uint8 0/1 image on the fixed grid."""
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        labels, _ = segmentation_to_labels(mask_node, fixed_node, fixed_image, context)
        mask = labels > 0
    elif mask_node.IsA("vtkMRMLScalarVolumeNode"):
        image = volume_to_image(mask_node, "mask")
        mask = sitk.Resample(image != 0, fixed_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    else:
        raise ValueError(
            f"mask '{mask_node.GetName()}' is a {mask_node.GetClassName()}; use a label map or segmentation"
        )
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    mask.CopyInformation(fixed_image)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise ValueError(f"mask '{mask_node.GetName()}' does not cover any voxel of the fixed volume")
    return mask


def add_segments_from_labels(segmentation_node, labels: sitk.Image, segments: Sequence[SegmentInfo]) -> None:
    """Fill a segmentation node with one segment per label value (names, colours and IDs kept)."""
    segmentation = segmentation_node.GetSegmentation()
    array = sitk.GetArrayViewFromImage(labels)
    for info in segments:
        binary = sitk.GetImageFromArray((array == info.label).astype(np.uint8))
        binary.CopyInformation(labels)
        segment_id = info.segment_id or f"label_{info.label}"
        if segmentation.GetSegment(segment_id) is not None:
            segmentation.RemoveSegment(segment_id)
        segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(
            oriented_image_from_image(binary), info.name, list(info.color), segment_id
        )
    segmentation.CollapseBinaryLabelmaps(False)


def segmentation_labels_on(segmentation_node, reference_image: sitk.Image) -> sitk.Image:
    """A segmentation's label map (label n = n-th segment) on a SimpleITK image's grid; nothing is added."""
    segments = segments_of(segmentation_node)
    out = np.zeros(sitk.GetArrayViewFromImage(reference_image).shape, np.uint16)
    for info in segments:
        oriented = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(info.segment_id, oriented)
        if oriented.GetPointData().GetScalars() is None or oriented.IsEmpty():
            continue
        image = image_from_oriented_image(oriented)
        binary = sitk.Resample(image, reference_image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        out[sitk.GetArrayViewFromImage(binary) > 0] = info.label
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(reference_image)
    return labels


def label_color_table(scene, name: str, segments: Sequence[SegmentInfo], table=None):
    """A user colour table with the segments' names and colours at their label values (added to ``scene``).

    ``table``: a colour table made by this function before, updated in place instead of adding a new one.
    """
    if table is None or table.GetAttribute(ROLE_PREFIX + "role") != "label-colors":
        table = slicer.vtkMRMLColorTableNode()
        table.SetName(scene.GenerateUniqueName(name))
        table.SetAttribute(ROLE_PREFIX + "role", "label-colors")
        table.SetHideFromEditors(False)
    table.SetTypeToUser()
    count = max([info.label for info in segments], default=0) + 1
    table.SetNumberOfColors(count)
    table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, count):
        table.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
    for info in segments:
        table.SetColor(info.label, info.name, *info.color, 1.0)
    if not scene.IsNodePresent(table):
        scene.AddNode(table)
    return table


def export_segmentation(segmentation_node, path: str | os.PathLike, reference: sitk.Image | None = None) -> Path:
    """Write a segmentation to ``.seg.nrrd`` (segments, names, colours) or to a label map file.

    A label map (``.nrrd``, ``.nii.gz``, ``.mha``...) holds label n for the n-th segment, on ``reference``'s
    grid (default: the segmentation's own reference geometry).
    """
    path = Path(path)
    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(SEGMENTATION_EXTENSIONS):
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentation_node):
            raise OSError(f"could not write the segmentation to {path}")
        return path
    if not name.endswith(LABELMAP_EXTENSIONS):
        raise ValueError(f"{path.name}: write a segmentation as .seg.nrrd, or a label map as .nrrd, .nii.gz or .mha")
    if reference is None:
        reference = _segmentation_reference_image(segmentation_node)
    labels = segmentation_labels_on(segmentation_node, reference)
    sitk.WriteImage(labels, str(path), useCompression=True)
    return path


def _segmentation_reference_image(segmentation_node) -> sitk.Image:
    geometry_string = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    if not geometry_string:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no reference geometry; give a reference")
    geometry = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry_string, geometry, False)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    extent = geometry.GetExtent()
    size = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    return _image_from_oriented(np.zeros(size[::-1], np.uint8), _array_from_matrix(matrix), extent[0::2])


# ----------------------------------------------------------------------------------------------------------------
# Result -> nodes
# ----------------------------------------------------------------------------------------------------------------


def jacobian_color_table(scene):
    """The diverging colour table for det J (blue: compression, white: 1, orange: expansion); one per scene."""
    existing = scene.GetFirstNodeByName(JACOBIAN_COLOR_NODE_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetName(JACOBIAN_COLOR_NODE_NAME)
    table.SetHideFromEditors(False)
    table.SetAttribute(ROLE_PREFIX + "role", "jacobian-colors")
    count = 256
    table.SetNumberOfColors(count)
    low, mid, high = np.array([0.23, 0.30, 0.75]), np.array([0.95, 0.95, 0.95]), np.array([0.85, 0.33, 0.05])
    for index in range(count):
        t = index / (count - 1)
        color = low + (mid - low) * (t / 0.5) if t <= 0.5 else mid + (high - mid) * ((t - 0.5) / 0.5)
        value = JACOBIAN_WINDOW[0] + t * (JACOBIAN_WINDOW[1] - JACOBIAN_WINDOW[0])
        table.SetColor(index, f"det J {value:.3f}", *color, 1.0)
    scene.AddNode(table)
    return table


@dataclass
class OutputNodes:
    """Existing nodes to overwrite with the results; ``None`` creates a new node (named after the inputs)."""

    transform: Any = None
    warped: Any = None
    jacobian: Any = None
    folding: Any = None
    segmentation: Any = None
    labelmap: Any = None
    create_labelmap: bool = True

    _classes = {
        "transform": "vtkMRMLGridTransformNode",
        "warped": "vtkMRMLScalarVolumeNode",
        "jacobian": "vtkMRMLScalarVolumeNode",
        "folding": "vtkMRMLSegmentationNode",
        "segmentation": "vtkMRMLSegmentationNode",
        "labelmap": "vtkMRMLLabelMapVolumeNode",
    }

    def items(self):
        return [(name, getattr(self, name)) for name in self._classes]


@dataclass
class RegistrationJob:
    """Everything a registration needs, read from the scene on the main thread (no MRML in here)."""

    moving: sitk.Image
    fixed: sitk.Image
    moving_labels: sitk.Image | None = None
    mask: sitk.Image | None = None
    segments: list[SegmentInfo] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    moving_name: str = "moving"
    fixed_name: str = "fixed"
    segmentation_name: str = "segmentation"
    node_ids: dict = field(default_factory=dict)


def _new_or_existing(scene, existing, cls_name: str, name: str):
    if existing is not None:
        return existing
    return scene.AddNewNodeByClass(cls_name, scene.GenerateUniqueName(name))


def _set_references(node, job: RegistrationJob, transform_node=None) -> None:
    for role in ("moving", "fixed"):
        node_id = job.node_ids.get(role)
        if node_id:
            node.SetNodeReferenceID(ROLE_PREFIX + role, node_id)
    if transform_node is not None and node is not transform_node:
        node.SetNodeReferenceID(ROLE_PREFIX + "transform", transform_node.GetID())


def _set_volume(scene, node, image: sitk.Image) -> None:
    update_volume_from_image(node, image)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None and not display.GetColorNodeID():
        grey = scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
        if grey is not None:
            display.SetAndObserveColorNodeID(grey.GetID())


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
    existing_ids = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
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
        colors = jacobian_color_table(scene)
        display = jacobian.GetDisplayNode()
        display.SetAndObserveColorNodeID(colors.GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*JACOBIAN_WINDOW)
        _set_references(jacobian, job, transform_node)

        folding = _new_or_existing(scene, outputs.folding, "vtkMRMLSegmentationNode", f"{pair} folding (det J <= 0)")
        _fill_segmentation(
            folding,
            result.folding,
            [SegmentInfo(1, FOLDING_SEGMENT_NAME, FOLDING_COLOR, FOLDING_SEGMENT_ID)],
            fixed_node,
        )
        folding.SetAttribute(ROLE_PREFIX + "folding_count", str(int(result.metrics.get("folding_count", 0))))
        _set_references(folding, job, transform_node)
        nodes = {"transform": transform_node, "warped": warped, "jacobian": jacobian, "folding": folding}

        if result.warped_labels is not None and job.segments:
            segmentation = _new_or_existing(
                scene, outputs.segmentation, "vtkMRMLSegmentationNode", f"{job.segmentation_name} on {job.fixed_name}"
            )
            _fill_segmentation(segmentation, result.warped_labels, job.segments, fixed_node)
            _set_references(segmentation, job, transform_node)
            nodes["segmentation"] = segmentation
            if outputs.create_labelmap or outputs.labelmap is not None:
                labelmap = _new_or_existing(
                    scene,
                    outputs.labelmap,
                    "vtkMRMLLabelMapVolumeNode",
                    f"{job.segmentation_name} on {job.fixed_name} label map",
                )
                update_volume_from_image(labelmap, sitk.Cast(result.warped_labels, sitk.sitkUInt16))
                if labelmap.GetDisplayNode() is None:
                    labelmap.CreateDefaultDisplayNodes()
                previous = labelmap.GetDisplayNode().GetColorNode()
                table = label_color_table(scene, f"{job.segmentation_name} labels", job.segments, previous)
                labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
                _set_references(labelmap, job, transform_node)
                nodes["labelmap"] = labelmap
    except Exception:
        # Remove everything this call added (nodes, their display and storage nodes, colour tables).
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(added):
            if node.GetID() not in existing_ids and scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise
    finally:
        scene.EndState(scene.BatchProcessState)
    return nodes


def _annotate_transform(node, result) -> None:
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
    if transform_node.GetDisplayNode() is None:
        transform_node.CreateDefaultDisplayNodes()
    display = transform_node.GetDisplayNode()
    display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    if fixed_node is not None:
        display.SetAndObserveRegionNode(fixed_node)
    display.SetVisibility2D(True)
    display.SetVisibility3D(False)
    display.SetVisibility(True)


def _copy_window_level(source, target) -> None:
    if source is None or source.GetDisplayNode() is None or target.GetDisplayNode() is None:
        return
    src, dst = source.GetDisplayNode(), target.GetDisplayNode()
    if src.GetColorNodeID():
        dst.SetAndObserveColorNodeID(src.GetColorNodeID())
    dst.SetAutoWindowLevel(src.GetAutoWindowLevel())
    if not src.GetAutoWindowLevel():
        dst.SetWindowLevel(src.GetWindow(), src.GetLevel())


def _fill_segmentation(node, labels: sitk.Image, segments: Sequence[SegmentInfo], reference_node) -> None:
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
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)


# ----------------------------------------------------------------------------------------------------------------
# The logic
# ----------------------------------------------------------------------------------------------------------------


def _check_3d(image: sitk.Image, node, what: str) -> None:
    size = image.GetSize()
    if min(size) < 2:
        raise ValueError(f"{what} '{node.GetName()}' is a 2-D image (size {size}); DTN registers 3-D volumes")
    if min(size) < 4:
        raise ValueError(f"{what} '{node.GetName()}' (size {size}) is too thin: at least 4 voxels along every axis")


class RegistrationLogic:
    """Registration of two volume nodes with the DTN engine, results as MRML nodes.

    Usable without the Slicer application: give it a :class:`SceneContext` (e.g. from
    :func:`create_headless_scene`); inside Slicer it defaults to the application's scene and logics.
    Inputs are never modified.
    """

    def __init__(
        self,
        scene=None,
        *,
        volumes_logic=None,
        segmentations_logic=None,
        transforms_logic=None,
        context: SceneContext | None = None,
    ) -> None:
        if context is None:
            if scene is None:
                context = app_context()
            else:
                context = SceneContext(scene, volumes_logic, segmentations_logic, transforms_logic)
        self.context = context
        self.last_result = None

    @property
    def scene(self):
        return self.context.scene

    # -- prepare (main thread) -------------------------------------------------------------------------------
    def prepare(
        self,
        moving_node,
        fixed_node,
        *,
        alpha: float | None = None,
        device: str = "auto",
        model: str | None = None,
        refine: int | None = None,
        affine: bool = True,
        mask_node=None,
        moving_segmentation_node=None,
        outputs: OutputNodes | None = None,
    ) -> RegistrationJob:
        """Validate the selection and read the inputs into SimpleITK images (copies)."""
        if moving_node is None:
            raise ValueError("Select a moving volume.")
        if fixed_node is None:
            raise ValueError("Select a fixed volume.")
        if moving_node is fixed_node or moving_node.GetID() == fixed_node.GetID():
            raise ValueError(f"'{moving_node.GetName()}' is selected as both the moving and the fixed volume.")
        for what, node in (("moving volume", moving_node), ("fixed volume", fixed_node)):
            if node.GetScene() is not None and node.GetScene() is not self.scene:
                raise ValueError(f"{what} '{node.GetName()}' belongs to another scene")
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ValueError(f"{what} '{node.GetName()}' is a label map; select an intensity image")
        moving = volume_to_image(moving_node, "moving volume")
        fixed = volume_to_image(fixed_node, "fixed volume")
        _check_3d(moving, moving_node, "moving volume")
        _check_3d(fixed, fixed_node, "fixed volume")
        if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha}")
        if refine is not None and int(refine) < 0:
            raise ValueError(f"refinement steps must be >= 0, got {refine}")
        if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
            raise ValueError(f"unknown device {device!r}; use auto, cuda or cpu")
        self._check_outputs(outputs, [moving_node, fixed_node, mask_node, moving_segmentation_node])

        job = RegistrationJob(
            moving=moving,
            fixed=fixed,
            options={
                "alpha": alpha,
                "device": device,
                "model": model or None,
                "refine": refine,
                "affine": bool(affine),
            },
            moving_name=moving_node.GetName(),
            fixed_name=fixed_node.GetName(),
            node_ids={"moving": moving_node.GetID(), "fixed": fixed_node.GetID()},
        )
        if mask_node is not None:
            job.mask = mask_to_image(mask_node, fixed_node, fixed, self.context)
            job.node_ids["mask"] = mask_node.GetID()
        if moving_segmentation_node is not None:
            if not moving_segmentation_node.IsA("vtkMRMLSegmentationNode"):
                raise ValueError(f"'{moving_segmentation_node.GetName()}' is not a segmentation")
            job.moving_labels, job.segments = segmentation_to_labels(
                moving_segmentation_node, moving_node, moving, self.context
            )
            job.segmentation_name = moving_segmentation_node.GetName()
            job.node_ids["segmentation"] = moving_segmentation_node.GetID()
        return job

    @staticmethod
    def _check_outputs(outputs: OutputNodes | None, inputs: list) -> None:
        if outputs is None:
            return
        input_ids = {node.GetID() for node in inputs if node is not None}
        for name, node in outputs.items():
            if node is None:
                continue
            if node.GetID() in input_ids:
                raise ValueError(f"output {name} '{node.GetName()}' is one of the inputs; inputs are never overwritten")
            wanted = OutputNodes._classes[name]
            is_labelmap_as_volume = wanted == "vtkMRMLScalarVolumeNode" and node.IsA("vtkMRMLLabelMapVolumeNode")
            if not node.IsA(wanted) or is_labelmap_as_volume:
                raise ValueError(f"output {name} '{node.GetName()}' is a {node.GetClassName()}; a {wanted} is needed")

    # -- compute (any thread, no MRML) -----------------------------------------------------------------------
    @staticmethod
    def compute(
        job: RegistrationJob,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ):
        """Run the engine on a prepared job; raises ``registration.Cancelled`` when cancelled."""
        from . import registration

        return registration.register(
            job.moving,
            job.fixed,
            moving_labels=job.moving_labels,
            mask=job.mask,
            progress=progress,
            cancel=cancel,
            **job.options,
        )

    # -- build (main thread) ---------------------------------------------------------------------------------
    def build(self, job: RegistrationJob, result, outputs: OutputNodes | None = None) -> dict[str, Any]:
        """Create the result nodes (only after a successful computation)."""
        fixed_node = self.scene.GetNodeByID(job.node_ids.get("fixed", "")) if job.node_ids.get("fixed") else None
        moving_node = self.scene.GetNodeByID(job.node_ids.get("moving", "")) if job.node_ids.get("moving") else None
        return build_result_nodes(self.context, job, result, outputs, fixed_node=fixed_node, moving_node=moving_node)

    def process(
        self,
        moving_node,
        fixed_node,
        *,
        alpha: float | None = None,
        device: str = "auto",
        model: str | None = None,
        refine: int | None = None,
        affine: bool = True,
        mask_node=None,
        moving_segmentation_node=None,
        outputs: OutputNodes | None = None,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Prepare, compute and build in one call (blocking); returns the created/updated nodes by role.

        The engine's ``RegistrationResult`` is kept as ``self.last_result``. Cancelling raises
        ``registration.Cancelled``; a failure raises; in both cases the scene is left as it was.
        """
        job = self.prepare(
            moving_node,
            fixed_node,
            alpha=alpha,
            device=device,
            model=model,
            refine=refine,
            affine=affine,
            mask_node=mask_node,
            moving_segmentation_node=moving_segmentation_node,
            outputs=outputs,
        )
        result = self.compute(job, progress=progress, cancel=cancel)
        nodes = self.build(job, result, outputs)
        self.last_result = result
        return nodes


def status_line(result) -> str:
    """One line for the user: folding count and percentage, device, time."""
    metrics = result.metrics
    return (
        f"Folding voxels (det J <= 0): {int(metrics.get('folding_count', 0))} "
        f"({float(metrics.get('folding_percent', 0.0)):.3f} %), device: {result.device}, "
        f"time: {float(result.timings.get('total', 0.0)):.1f} s"
    )


# ----------------------------------------------------------------------------------------------------------------
# Headless rendering of a slice (no OpenGL): thumbnails and screenshots
# ----------------------------------------------------------------------------------------------------------------


def render_slice_image(
    context: SceneContext,
    background,
    foreground=None,
    label=None,
    orientation: str = "Axial",
    offset: float | None = None,
    size: tuple[int, int] = (256, 256),
    foreground_opacity: float = 0.5,
):
    """A slice view's blended layers (background, foreground, label map) as a ``vtkImageData`` (RGBA).

    Rendered by ``vtkMRMLSliceLogic`` without OpenGL, on a temporary slice node that is removed again.
    Segmentations and transform grids are drawn by OpenGL displayable managers and do not appear; show a
    segmentation through its label map instead.
    """
    scene = context.scene
    existing_ids = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    slice_node = slicer.vtkMRMLSliceNode()
    slice_node.SetName("DTNRegistrationRender")
    slice_node.SetLayoutName("DTNRegistrationRender")
    for name in ("Axial", "Sagittal", "Coronal"):  # radiological convention, as Slicer's views
        matrix = vtk.vtkMatrix3x3()
        getattr(slicer.vtkMRMLSliceNode, f"Get{name}SliceToRASMatrix")(matrix, True)
        slice_node.AddSliceOrientationPreset(name, matrix)
    scene.AddNode(slice_node)
    slice_node.SetDimensions(size[0], size[1], 1)
    slice_node.SetOrientation(orientation)
    logic = slicer.vtkMRMLSliceLogic()
    try:
        if context.application_logic is not None:
            logic.SetMRMLApplicationLogic(context.application_logic)
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(slice_node)
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(foreground_opacity if foreground is not None else 0.0)
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)
        composite.SetLabelOpacity(0.6)
        logic.FitSliceToVolume(background, size[0], size[1])
        if offset is not None:
            logic.SetSliceOffset(offset)
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = vtk.vtkImageData()
        image.DeepCopy(producer.GetOutputDataObject(0))
        return image
    finally:
        logic.SetMRMLScene(None)
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(added):  # the slice node, its composite node, slice model and display nodes
            if node.GetID() not in existing_ids and scene.IsNodePresent(node):
                scene.RemoveNode(node)


def render_slice(context: SceneContext, background, **options) -> np.ndarray:
    """:func:`render_slice_image` as a numpy RGBA array, top row first (ready for matplotlib or PIL)."""
    image = render_slice_image(context, background, **options)
    width, height, _ = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(array[::-1])


# ----------------------------------------------------------------------------------------------------------------
# Scenes for the command line
# ----------------------------------------------------------------------------------------------------------------


def add_volume_node(context: SceneContext, image: sitk.Image, name: str, labelmap: bool = False):
    """Add a volume node holding a SimpleITK image (with display) to the context's scene."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = context.scene.AddNewNodeByClass(cls, name)
    update_volume_from_image(node, image)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if not labelmap and display is not None:
        grey = context.scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
        if grey is not None:
            display.SetAndObserveColorNodeID(grey.GetID())
        display.SetAutoWindowLevel(True)
    return node


def default_segments(labels: sitk.Image, names: dict[int, str] | None = None) -> list[SegmentInfo]:
    """One segment per non-zero label value of a label map ("Label N" unless named), palette colours."""
    values = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0)
    names = names or {}
    return [
        SegmentInfo(value, names.get(value, f"Label {value}"), _PALETTE[i % len(_PALETTE)], f"label_{value}")
        for i, value in enumerate(values)
    ]


def save_result_scene(
    moving: sitk.Image,
    fixed: sitk.Image,
    result,
    mrb_path: str | os.PathLike,
    moving_labels: sitk.Image | None = None,
    segments: Sequence[SegmentInfo] | None = None,
    names: tuple[str, str] = ("moving", "fixed"),
) -> Path:
    """Build the inputs and every result node in a fresh headless scene and write it as a .mrb bundle.

    ``moving_labels`` (on the moving grid) becomes a segmentation; with ``result.warped_labels`` the propagated
    segmentation and its label map are added. Returns the path written.
    """
    mrb_path = Path(mrb_path)
    if mrb_path.suffix.lower() != ".mrb":
        raise ValueError(f"{mrb_path.name}: a scene bundle is written as .mrb")
    with tempfile.TemporaryDirectory(prefix="dtnreg-scene-") as cache:
        context = create_headless_scene(cache)
        moving_node = add_volume_node(context, moving, names[0])
        fixed_node = add_volume_node(context, fixed, names[1])
        job = RegistrationJob(
            moving=moving,
            fixed=fixed,
            moving_name=names[0],
            fixed_name=names[1],
            node_ids={"moving": moving_node.GetID(), "fixed": fixed_node.GetID()},
        )
        if moving_labels is not None:
            labels = sitk.Cast(moving_labels, sitk.sitkUInt16)
            job.segments = list(segments) if segments else default_segments(labels)
            job.segmentation_name = f"{names[0]} segmentation"
            seg_node = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", job.segmentation_name)
            _fill_segmentation(seg_node, labels, job.segments, moving_node)
            job.node_ids["segmentation"] = seg_node.GetID()
        nodes = build_result_nodes(context, job, result, fixed_node=fixed_node, moving_node=moving_node)
        try:
            thumbnail = render_slice_image(context, fixed_node, foreground=nodes["warped"], label=nodes.get("labelmap"))
        except Exception:  # a preview is a nicety; never lose the scene over it
            thumbnail = None
        write_mrb(context.scene, mrb_path, thumbnail)
    return mrb_path


def write_mrb(scene, mrb_path: str | os.PathLike, thumbnail=None) -> Path:
    """Write a scene as a .mrb bundle (each storable node gets a default storage node first).

    ``thumbnail``: an optional ``vtkImageData`` (e.g. from :func:`render_slice_image`) stored as the bundle's
    preview.
    """
    mrb_path = Path(mrb_path)
    mrb_path.parent.mkdir(parents=True, exist_ok=True)
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.IsA("vtkMRMLStorableNode") and node.GetStorageNode() is None and not node.GetHideFromEditors():
            node.AddDefaultStorageNode()
    for node in _nodes_of(scene, "vtkMRMLColorTableNode"):
        if node.GetStorageNode() is None and node.GetType() == node.User:
            node.AddDefaultStorageNode()
    messages = slicer.vtkMRMLMessageCollection()
    if not scene.WriteToMRB(str(mrb_path), thumbnail, messages):
        raise OSError(f"could not write the scene to {mrb_path}: {messages.GetAllMessagesAsString()}")
    return mrb_path


def _nodes_of(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def write_scene_from_files(
    moving: str | os.PathLike | sitk.Image,
    fixed: str | os.PathLike | sitk.Image,
    result,
    mrb_path: str | os.PathLike,
    moving_labels: str | os.PathLike | sitk.Image | None = None,
    names: tuple[str, str] | None = None,
) -> Path:
    """For ``dtnreg register --scene out.mrb``: the inputs and a ``RegistrationResult`` as a .mrb bundle.

    ``moving``, ``fixed`` and ``moving_labels`` are file paths or SimpleITK images (the moving labels on the
    moving image's grid). Nodes are named after the files (or ``names``, default "moving" and "fixed").
    """
    from . import imaging

    def image(source, what: str) -> sitk.Image:
        if isinstance(source, sitk.Image):
            return source
        return imaging.squeeze_to_3d(sitk.ReadImage(str(source)), f"{what} {source}")

    moving_image = image(moving, "moving image")
    fixed_image = image(fixed, "fixed image")
    labels = None
    if moving_labels is not None:
        labels = moving_labels
        if not isinstance(labels, sitk.Image):
            labels = imaging.read_labels(moving_labels, moving_image, "moving labels")
    if names is None:
        names = tuple(
            _stem(source) if not isinstance(source, sitk.Image) else default
            for source, default in ((moving, "moving"), (fixed, "fixed"))
        )
    return save_result_scene(moving_image, fixed_image, result, mrb_path, moving_labels=labels, names=names)


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


__all__ = [
    "OutputNodes",
    "RegistrationJob",
    "RegistrationLogic",
    "SceneContext",
    "SegmentInfo",
    "app_context",
    "build_result_nodes",
    "create_headless_scene",
    "displacement_to_grid_transform",
    "export_segmentation",
    "grid_transform_to_displacement",
    "image_ijk_to_ras",
    "save_result_scene",
    "segmentation_to_labels",
    "status_line",
    "update_volume_from_image",
    "volume_to_image",
    "render_slice",
    "render_slice_image",
    "restore_linear_interpolation",
    "write_mrb",
    "write_scene_from_files",
]
