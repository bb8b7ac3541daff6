"""The network's field on the work grid -> ITK displacement fields on the images' own grids (mm, LPS).

One field does the whole mapping, affine included, so that ``sitk.Resample(moving, fixed,
DisplacementFieldTransform(field))`` alone reproduces the warped image; beyond the work grid the field continues
with its border values, so the map has no seam there.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from . import imaging


def field_image(u: torch.Tensor, reference: sitk.Image, cover: np.ndarray) -> sitk.Image:
    """Voxel-unit field (array axes k, j, i) on the LPS-aligned model grid -> ITK field (x, y, z in mm).

    The field is continued beyond the grid with its border values (zero-flux Neumann padding) far enough to
    contain the physical points ``cover``. Outside its grid ITK's field transform is zero; a network's field can
    be millimetres large at the grid's edge (in the background), and that jump to zero would fold the map there.
    The continuation keeps the map continuous and adds no compression.
    """
    array = u[0].detach().cpu().numpy()[::-1].transpose(1, 2, 3, 0) * reference.GetSpacing()[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float64), isVector=True)
    image.CopyInformation(reference)
    lower, upper = padding_to_cover(reference, cover)
    return sitk.ZeroFluxNeumannPad(image, lower, upper) if any(lower + upper) else image


def corners(image: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
    """The physical points of ``image``'s eight corner voxels, mapped by ``transform`` when one is given."""
    size = image.GetSize()
    points = [
        image.TransformContinuousIndexToPhysicalPoint([float(c * (n - 1)) for c, n in zip(corner, size)])
        for corner in np.ndindex(2, 2, 2)
    ]
    return np.array([transform.TransformPoint(p) for p in points] if transform is not None else points)


def padding_to_cover(reference: sitk.Image, points: np.ndarray) -> tuple[list[int], list[int]]:
    """Voxels to add below and above each axis of ``reference`` (identity direction) to contain ``points``.

    Enough for the corners of an affinely mapped box: their bounding box contains all of it.
    """
    spacing, origin = np.array(reference.GetSpacing()), np.array(reference.GetOrigin())
    first = np.floor((points.min(0) - origin) / spacing) - 1
    last = np.ceil((points.max(0) - origin) / spacing) + 1
    lower = np.maximum(0, -first).astype(int)
    upper = np.maximum(0, last - (np.array(reference.GetSize()) - 1)).astype(int)
    return lower.tolist(), upper.tolist()


def full_transform(grid_field: sitk.Image, affine: sitk.Transform, inverse: bool = False) -> sitk.Transform:
    """The whole mapping as one ITK transform, without a field on the full grid.

    Forward (fixed to moving): ``x -> A(x + d(x))``. Inverse (moving to fixed): ``y -> z + d_inv(z)``,
    ``z = A^-1(y)``. Resampling through it samples exactly the points of ``full_map``'s field, without building
    an ITK transform over a full-resolution field (1.3-2.8 s each at 0.5 mm, docs/benchmarks.md).
    """
    deform = imaging.field_transform(grid_field)
    composite = sitk.CompositeTransform(3)
    if inverse:  # applied last-added first: A^-1, then the inverse deformation
        composite.AddTransform(deform)
        composite.AddTransform(affine)
    else:
        composite.AddTransform(affine)
        composite.AddTransform(deform)
    return composite


def full_map(grid_field: sitk.Image, affine: sitk.Transform, reference: sitk.Image, inverse: bool = False):
    """The single ITK displacement field on ``reference``'s grid that does the whole mapping (``full_transform``)."""
    return field_of(full_transform(grid_field, affine, inverse), reference)


def field_of(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """``transform``'s displacement sampled at ``reference``'s voxels (float64, mm)."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return to_field.Execute(transform)


__all__ = ["corners", "field_image", "field_of", "full_map", "full_transform", "padding_to_cover"]
