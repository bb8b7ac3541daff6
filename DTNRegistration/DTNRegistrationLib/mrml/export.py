"""Writing to files: a segmentation (.seg.nrrd or a label map), and a scene with a result as a .mrb bundle."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk  # noqa: N813
import slicer

from ..files import image_stem
from .job import RegistrationJob
from .nodes import add_volume_node, build_result_nodes, fill_segmentation
from .render import render_slice_image
from .scene import create_headless_scene, nodes_of
from .segmentations import SegmentInfo, default_segments, segmentation_labels_on, segmentation_reference_image

SEGMENTATION_EXTENSIONS = (".seg.nrrd", ".seg.nhdr")
LABELMAP_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


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
        reference = segmentation_reference_image(segmentation_node)
    labels = segmentation_labels_on(segmentation_node, reference)
    sitk.WriteImage(labels, str(path), useCompression=True)
    return path


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
    for node in nodes_of(scene, "vtkMRMLColorTableNode"):
        if node.GetStorageNode() is None and node.GetType() == node.User:
            node.AddDefaultStorageNode()
    messages = slicer.vtkMRMLMessageCollection()
    if not scene.WriteToMRB(str(mrb_path), thumbnail, messages):
        raise OSError(f"could not write the scene to {mrb_path}: {messages.GetAllMessagesAsString()}")
    return mrb_path


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
            fill_segmentation(seg_node, labels, job.segments, moving_node)
            job.node_ids["segmentation"] = seg_node.GetID()
        nodes = build_result_nodes(context, job, result, fixed_node=fixed_node, moving_node=moving_node)
        try:
            thumbnail = render_slice_image(context, fixed_node, foreground=nodes["warped"], label=nodes.get("labelmap"))
        except Exception:  # a preview is a nicety; never lose the scene over it
            thumbnail = None
        write_mrb(context.scene, mrb_path, thumbnail)
    return mrb_path


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
    from ..core import imaging

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
            image_stem(source) if not isinstance(source, sitk.Image) else default
            for source, default in ((moving, "moving"), (fixed, "fixed"))
        )
    return save_result_scene(moving_image, fixed_image, result, mrb_path, moving_labels=labels, names=names)
