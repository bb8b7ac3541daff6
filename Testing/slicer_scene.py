"""Helpers for the MRML tests: a Slicer-like headless scene (slicer-core), oblique test volumes, a tiny model.

Importing this module needs ``slicer`` (``pip install slicer-core``); test modules check that first and skip
loudly where it cannot be imported.
"""

from __future__ import annotations

import hashlib

import numpy as np
import slicer
import vtk

from DTNRegistrationLib import mrml
from DTNRegistrationLib.mrml.phantoms import (  # noqa: F401  (re-exported for the tests)
    FIXED_IJK_TO_RAS,
    FIXED_SIZE,
    MOVING_IJK_TO_RAS,
    MOVING_SIZE,
    add_segmentation_from_labels,
    add_volume_from_array,
    make_test_volumes,
    oblique_ijk_to_ras,
    phantom,
    ras_grid,
    rotation,
    write_tiny_model,
)


def headless_scene() -> mrml.SceneContext:
    """A fresh scene with the Volumes, Transforms, Segmentations and SubjectHierarchy logics (see mrml)."""
    return mrml.create_headless_scene()


def ijk_to_ras_of(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_checksum(node) -> str:
    """A digest of everything a registration must not change in an input node."""
    digest = hashlib.sha256()
    digest.update(node.GetName().encode())
    if node.IsA("vtkMRMLVolumeNode"):
        digest.update(np.ascontiguousarray(slicer.util.arrayFromVolume(node)).tobytes())
        digest.update(ijk_to_ras_of(node).tobytes())
    if node.IsA("vtkMRMLSegmentationNode"):
        seg = node.GetSegmentation()
        for index in range(seg.GetNumberOfSegments()):
            segment_id = seg.GetNthSegmentID(index)
            segment = seg.GetSegment(segment_id)
            digest.update(f"{segment_id}|{segment.GetName()}|{tuple(segment.GetColor())}".encode())
            oriented = slicer.vtkOrientedImageData()
            node.GetBinaryLabelmapRepresentation(segment_id, oriented)
            digest.update(np.ascontiguousarray(mrml._numpy_from_image_data(oriented)).tobytes())
    parent = node.GetParentTransformNode()
    digest.update((parent.GetID() if parent else "none").encode())
    return digest.hexdigest()


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
