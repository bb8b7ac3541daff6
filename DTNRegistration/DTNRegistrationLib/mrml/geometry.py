"""Volume nodes <-> SimpleITK images: the one place where RAS and LPS meet.

A volume node stores voxels in a ``vtkImageData`` (index ``i`` fastest) and its geometry in its IJK-to-RAS
matrix ``M``: ``RAS = M @ (i, j, k, 1)``. A SimpleITK image stores ``LPS = origin + D @ diag(s) @ (i, j, k)``.
With ``F = diag(-1, -1, 1)`` (its own inverse), ``M[:3, :3] = F @ D @ diag(s)`` and ``M[:3, 3] = F @ origin``.
No axis is ever flipped or permuted: oblique and left-handed IJK-to-RAS matrices come through exactly, whatever
the array orientation. Linear parent transforms of the inputs are taken into account (the images are registered
in world coordinates); non-linear ones must be hardened first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk  # noqa: N813
import slicer
import vtk
from vtk.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # also RAS -> LPS: its own inverse


# -- vtk matrices and voxel arrays ---------------------------------------------------------------------------


def array_from_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def numpy_from_image_data(image_data: vtk.vtkImageData) -> np.ndarray:
    """Voxels of a vtkImageData as a (K, J, I) or (K, J, I, C) numpy array (a copy)."""
    dims = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    if scalars is None:
        raise ValueError("the image has no voxels")
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars).copy()
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return array.reshape(shape)


def image_data_from_numpy(array: np.ndarray, components: int = 1) -> vtk.vtkImageData:
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


# -- IJK-to-RAS <-> SimpleITK origin, spacing and direction --------------------------------------------------


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


def image_from_voxels(voxels: np.ndarray, ijk_to_ras: np.ndarray, extent_start: Sequence[int]) -> sitk.Image:
    """A SimpleITK image from (K, J, I) voxels whose first voxel sits at IJK ``extent_start``."""
    image = sitk.GetImageFromArray(voxels)
    matrix = np.array(ijk_to_ras, dtype=np.float64)
    matrix[:3, 3] = (matrix @ np.array([*extent_start, 1.0]))[:3]
    return set_image_geometry(image, matrix)


def node_ijk_to_ras(node) -> np.ndarray:
    """A volume node's own IJK-to-RAS (its parent transform ignored)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return array_from_matrix(matrix)


def node_ijk_to_world(node, what: str = "volume") -> np.ndarray:
    """IJK-to-RAS of a volume node in world coordinates: its own matrix, after any *linear* parent transform."""
    ijk_to_ras = node_ijk_to_ras(node)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(
                f"{what} '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
                "harden the transform on it first (Data module, right-click, Harden transform)"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = array_from_matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


# -- volume nodes and oriented image data <-> SimpleITK images -----------------------------------------------


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
    ijk_to_ras = node_ijk_to_world(node, what) if world else node_ijk_to_ras(node)
    extent = image_data.GetExtent()
    return image_from_voxels(numpy_from_image_data(image_data), ijk_to_ras, extent[0::2])


def update_volume_from_image(node, image: sitk.Image):
    """Set a volume node's voxels and IJK-to-RAS from a 3-D SimpleITK image (scalar or vector); returns node."""
    if image.GetDimension() != 3:
        raise ValueError(f"a 3-D image is needed, got {image.GetDimension()}-D")
    components = image.GetNumberOfComponentsPerPixel()
    image_data = image_data_from_numpy(sitk.GetArrayFromImage(image), components)
    node.SetIJKToRASMatrix(matrix_from_array(image_ijk_to_ras(image)))
    node.SetAndObserveImageData(image_data)
    return node


def oriented_image_from_image(image: sitk.Image):
    """A ``vtkOrientedImageData`` (the segmentations' labelmap type) from a 3-D SimpleITK image."""
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(image_data_from_numpy(sitk.GetArrayFromImage(image)))
    oriented.SetImageToWorldMatrix(matrix_from_array(image_ijk_to_ras(image)))
    return oriented


def image_from_oriented_image(oriented) -> sitk.Image:
    """A SimpleITK image from a ``vtkOrientedImageData`` (any extent)."""
    return image_from_voxels(
        numpy_from_image_data(oriented), oriented_image_to_world(oriented), oriented.GetExtent()[0::2]
    )


def oriented_image_to_world(oriented) -> np.ndarray:
    """The 4x4 image-to-world (IJK-to-RAS) matrix of a ``vtkOrientedImageData``."""
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    return array_from_matrix(matrix)
