"""Small test volumes and a tiny random model for self-tests, inside Slicer and headless (slicer-core).

Two volume geometries that catch every orientation mistake, a head-like phantom drawn in physical space (so
both volumes show the same anatomy), a segmentation imported the way Slicer's own loaders do, and a randomly
initialised DTN saved as a weights file. Used by the module's self-test and by Testing/slicer_scene.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk

# Two volume geometries that catch every orientation mistake: rotated about all three axes, anisotropic,
# and left-handed (det < 0), one flipped along I, the other along K.
FIXED_SIZE = (32, 30, 28)
MOVING_SIZE = (34, 32, 36)


def rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_ijk_to_ras(
    angles: tuple[float, float, float], spacing: tuple[float, float, float], flip: int, origin
) -> np.ndarray:
    """A 4x4 IJK-to-RAS: rotation about R, A, S, anisotropic spacing, axis ``flip`` reversed (left-handed)."""
    flips = np.ones(3)
    flips[flip] = -1.0
    matrix = np.eye(4)
    matrix[:3, :3] = (
        rotation(2, angles[2]) @ rotation(1, angles[1]) @ rotation(0, angles[0]) @ np.diag(spacing) @ np.diag(flips)
    )
    matrix[:3, 3] = origin
    return matrix


FIXED_IJK_TO_RAS = oblique_ijk_to_ras((0.2, 0.0, 0.4), (1.2, 1.0, 1.1), 0, (12.0, -15.0, -18.0))
MOVING_IJK_TO_RAS = oblique_ijk_to_ras((0.0, -0.3, 0.15), (1.0, 1.1, 0.9), 2, (-14.0, -16.0, 20.0))


def ras_grid(size: tuple[int, int, int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS coordinates of every voxel, shape (K, J, I, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def phantom(ras: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A smooth head-like intensity pattern in physical space (so both volumes show the same anatomy)."""
    p = ras + np.asarray(shift)
    head = np.exp(-((p[..., 0] / 13.0) ** 2 + (p[..., 1] / 15.0) ** 2 + (p[..., 2] / 12.0) ** 2))
    inner = np.exp(-(((p[..., 0] - 3.0) / 5.0) ** 2 + ((p[..., 1] + 2.0) / 6.0) ** 2 + (p[..., 2] / 5.0) ** 2))
    return (80.0 * head + 60.0 * inner + 4.0 * np.sin(p[..., 0] / 3.0) * head).astype(np.float32)


def add_volume_from_array(context, array: np.ndarray, ijk_to_ras: np.ndarray, name: str, labelmap: bool = False):
    """A volume node filled the way Slicer's own loaders do (vtkImageData + IJK-to-RAS), not via mrml."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = context.scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, array)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    return node


def make_test_volumes(context):
    """Fixed and moving volume nodes with oblique, left-handed geometry and a segmentation on the moving one."""
    fixed_array = phantom(ras_grid(FIXED_SIZE, FIXED_IJK_TO_RAS))
    moving_ras = ras_grid(MOVING_SIZE, MOVING_IJK_TO_RAS)
    moving_array = phantom(moving_ras, shift=(1.5, -1.0, 0.5))
    fixed = add_volume_from_array(context, fixed_array, FIXED_IJK_TO_RAS, "fixed")
    moving = add_volume_from_array(context, moving_array, MOVING_IJK_TO_RAS, "moving")
    labels = (moving_array > 30).astype(np.uint16) + (moving_array > 70)
    segmentation = add_segmentation_from_labels(
        context, labels, MOVING_IJK_TO_RAS, {1: ("Head", (0.2, 0.8, 0.2)), 2: ("Core", (0.9, 0.9, 0.1))}, moving
    )
    return moving, fixed, segmentation, labels


def add_segmentation_from_labels(context, labels: np.ndarray, ijk_to_ras, segments: dict, reference_node):
    """A segmentation node built with Slicer's own import (label map node -> segments), then named/coloured."""
    scene = context.scene
    label_node = add_volume_from_array(context, labels.astype(np.uint16), ijk_to_ras, "tmp labels", labelmap=True)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    ok = context.segmentations_logic.ImportLabelmapToSegmentationNode(label_node, segmentation)
    assert ok, "Slicer could not import the label map"
    display = label_node.GetDisplayNode()
    scene.RemoveNode(label_node)
    if display is not None and scene.IsNodePresent(display):
        scene.RemoveNode(display)
    seg = segmentation.GetSegmentation()
    for index in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(index)
        value = int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else index + 1
        name, color = segments[value]
        segment.SetName(name)
        segment.SetColor(*color)
    segmentation.CreateDefaultDisplayNodes()
    return segmentation


def write_tiny_model(path: Path, alpha: float = 0.1) -> Path:
    """A small randomly initialised DTN saved as a weights file (enough to exercise the whole pipeline; torch)."""
    from ..core import models, network

    cfg = network.DTNConfig(
        enc_channels=(4, 8, 8, 16),
        q_s=16,
        q_c=16,
        dec_channels=(16, 8, 8, 8),
        heads=2,
        ts_encoder_layers=1,
        ts_decoder_layers=1,
        tc_layers=1,
        alpha=alpha,
    )
    import torch

    torch.manual_seed(0)
    models.save_weights(network.build_model(cfg), path, {"spacing_mm": 2.0})
    return path
