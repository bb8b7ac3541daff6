"""Headless rendering of a slice view (no OpenGL): thumbnails and screenshots."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .scene import SceneContext, node_ids, remove_nodes_added_since


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
    ids_before = node_ids(scene)
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
        # The slice node, its composite node, slice model and display nodes.
        remove_nodes_added_since(scene, ids_before)


def render_slice(context: SceneContext, background, **options) -> np.ndarray:
    """:func:`render_slice_image` as a numpy RGBA array, top row first (ready for matplotlib or PIL)."""
    image = render_slice_image(context, background, **options)
    width, height, _ = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(array[::-1])
