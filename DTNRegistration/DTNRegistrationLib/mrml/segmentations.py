"""Segmentations <-> label maps: a segmentation travels through the registration as one label value per segment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk  # noqa: N813
import slicer
import vtk

from .geometry import (
    image_from_oriented_image,
    image_from_voxels,
    node_ijk_to_ras,
    oriented_image_from_image,
    oriented_image_to_world,
    set_image_geometry,
    volume_to_image,
)
from .scene import SceneContext

# Colours for label maps that come without names or colours (e.g. from the command line).
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


def default_segments(labels: sitk.Image, names: dict[int, str] | None = None) -> list[SegmentInfo]:
    """One segment per non-zero label value of a label map ("Label N" unless named), palette colours."""
    values = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0)
    names = names or {}
    return [
        SegmentInfo(value, names.get(value, f"Label {value}"), _PALETTE[i % len(_PALETTE)], f"label_{value}")
        for i, value in enumerate(values)
    ]


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
        local_reference = set_image_geometry(sitk.Image(reference_image), node_ijk_to_ras(reference_node))
        labels = sitk.Resample(labels, local_reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(labels).astype(np.uint16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference_image)
    return out, segments


def mask_to_image(
    mask_node, fixed_node, fixed_image: sitk.Image, context: SceneContext, what: str = "fixed volume"
) -> sitk.Image:
    """A mask (label map, scalar volume or segmentation) as a uint8 0/1 image on the grid of ``fixed_image`` (the
    ``what`` the messages name)."""
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
        raise ValueError(f"mask '{mask_node.GetName()}' does not cover any voxel of the {what}")
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


def segmentation_reference_image(segmentation_node) -> sitk.Image:
    """An empty (all zero) image on a segmentation's reference geometry; raises if it has none."""
    geometry_string = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    if not geometry_string:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no reference geometry; give a reference")
    geometry = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry_string, geometry, False)
    extent = geometry.GetExtent()
    size = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    return image_from_voxels(np.zeros(size[::-1], np.uint8), oriented_image_to_world(geometry), extent[0::2])
