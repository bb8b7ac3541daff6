"""Displacement fields <-> grid transforms.

A displacement field (ITK convention: vectors in LPS mm on the fixed grid, ``warped(x) = moving(x + u(x))``)
becomes a ``vtkOrientedGridTransform`` set *FromParent* on a ``vtkMRMLGridTransformNode``: grid origin, spacing
and direction in RAS, vectors in RAS (x and y negated), linear interpolation, so that Slicer's resampling of the
moving volume through the node reproduces the engine's warped image.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk  # noqa: N813
import slicer
import vtk

from .geometry import (
    array_from_matrix,
    image_data_from_numpy,
    image_ijk_to_ras,
    matrix_from_array,
    numpy_from_image_data,
    set_image_geometry,
)
from .scene import ROLE_PREFIX, nodes_of


def displacement_to_grid_transform(displacement: sitk.Image):
    """An ITK displacement field (LPS mm, fixed grid) as a ``vtkOrientedGridTransform`` in RAS.

    Set it *FromParent* on a grid transform node: a point ``x`` (RAS) of the fixed image maps to
    ``x + u(x)`` in the moving image, which is how Slicer resamples the moving volume.
    """
    if displacement.GetNumberOfComponentsPerPixel() != 3 or displacement.GetDimension() != 3:
        raise ValueError("a 3-D displacement field with 3 components is needed")
    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)  # (K, J, I, 3), LPS
    vectors[..., :2] *= -1.0  # LPS -> RAS
    grid = image_data_from_numpy(vectors, components=3)
    ijk_to_ras = image_ijk_to_ras(displacement)
    spacing = np.array(displacement.GetSpacing())
    grid.SetOrigin(*ijk_to_ras[:3, 3])
    grid.SetSpacing(*spacing)
    direction = np.eye(4)
    direction[:3, :3] = ijk_to_ras[:3, :3] / spacing
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(matrix_from_array(direction))
    transform.SetDisplacementScale(1.0)
    transform.SetDisplacementShift(0.0)
    transform.SetInterpolationModeToLinear()
    return transform


def grid_transform_to_displacement(transform_node) -> sitk.Image:
    """The FromParent displacement grid of a grid transform node back as an ITK field (LPS mm)."""
    transform = transform_node.GetTransformFromParentAs("vtkOrientedGridTransform")
    if transform is None:
        raise ValueError(f"'{transform_node.GetName()}' holds no grid transform in the FromParent direction")
    grid = transform.GetDisplacementGrid()
    vectors = numpy_from_image_data(grid).astype(np.float64)
    vectors = vectors * transform.GetDisplacementScale() + transform.GetDisplacementShift()
    vectors[..., :2] *= -1.0  # RAS -> LPS
    image = sitk.GetImageFromArray(vectors, isVector=True)
    matrix = np.eye(4)
    direction_matrix = transform.GetGridDirectionMatrix()
    direction = array_from_matrix(direction_matrix)[:3, :3] if direction_matrix is not None else np.eye(3)
    matrix[:3, :3] = direction @ np.diag(grid.GetSpacing())
    matrix[:3, 3] = grid.GetOrigin()
    return set_image_geometry(image, matrix)


def restore_linear_interpolation(scene) -> int:
    """Set linear interpolation again on this module's grid transforms; returns how many were reset.

    Transform files do not store the interpolation mode and a grid transform read from file comes back cubic,
    which no longer reproduces the engine's (trilinear) warped image exactly. Call after loading a scene.
    """
    count = 0
    for node in nodes_of(scene, "vtkMRMLGridTransformNode"):
        if node.GetAttribute(ROLE_PREFIX + "alpha") is None:  # not made by DTN Registration
            continue
        transform = node.GetTransformFromParentAs("vtkOrientedGridTransform")
        if transform is not None and transform.GetInterpolationMode() != vtk.VTK_LINEAR_INTERPOLATION:
            transform.SetInterpolationModeToLinear()
            node.SetAndObserveTransformFromParent(transform)
            count += 1
    return count
