"""Spatial transforms on dense fields: warping, scaling and squaring, composition, resizing.

Sampling convention (used everywhere in the engine):

* Volumes are tensors ``(B, C, D, H, W)`` whose spatial axes are the array axes of
  ``SimpleITK.GetArrayFromImage`` (k, j, i).
* A displacement field ``u`` is a tensor ``(B, 3, D, H, W)`` in **voxel units**; channel ``c`` is the
  displacement along spatial axis ``c`` (0 = D/k, 1 = H/j, 2 = W/i).
* ``warp(moving, u)(x) = moving(x + u(x))``: the field lives on the fixed grid and points into the moving
  image (a "pull" or fixed-to-moving map), as ITK's displacement-field transforms and Slicer's grid
  transforms set "FromParent" do.
* Voxel ``x`` is sampled exactly at its index (``align_corners=True``); outside the image, images read 0
  and fields are clamped to the border.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_INTEGRATION_STEPS = 7


def identity_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid, shape ``(1, 3, D, H, W)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _normalised_grid(u: torch.Tensor) -> torch.Tensor:
    """Voxel positions ``x + u(x)`` as the ``(B, D, H, W, 3)`` (x, y, z) grid that ``grid_sample`` wants."""
    shape = tuple(u.shape[2:])
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in reversed(shape)], device=u.device, dtype=u.dtype)
    offset = (u.flip(1) * scale.view(1, 3, 1, 1, 1)).permute(0, 2, 3, 4, 1)
    return _normalised_identity(shape, u.device, u.dtype) + offset


@functools.lru_cache(maxsize=8)
def _normalised_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The identity grid in ``grid_sample``'s coordinates (built once per grid: an optimisation warps thousands of
    times on the same one)."""
    with torch.inference_mode(False):  # a normal tensor, usable with autograd whichever mode built it first
        axes = [_axis(n, device, dtype) for n in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)
        return grid.flip(-1).contiguous()


def _axis(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if n == 1:
        return torch.full((1,), -1.0, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


@dataclass(frozen=True)
class SeenThroughAffine:
    """An image on its own grid, seen from a grid of ``shape`` through an affine map of voxel indices (array order):
    grid position ``p`` reads ``image(index_map @ [p, 1])``. Warping it samples the image once, at the affine and the
    deformation together, instead of resampling it through the affine first and again at every step (two linear
    interpolations: a blur that the fixed image does not have, worst where the deformation undoes a sub-voxel
    shift; docs/benchmarks.md)."""

    image: torch.Tensor  # (1, C, d, h, w)
    index_map: torch.Tensor  # (3, 4)
    shape: tuple[int, int, int]

    def on_grid(self) -> torch.Tensor:
        """The image resampled onto the grid (one linear interpolation): for what needs it there as a tensor."""
        return warp(self, torch.zeros(1, 3, *self.shape, device=self.image.device, dtype=self.image.dtype))


@functools.lru_cache(maxsize=4)
def _cached_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # usable with autograd whichever mode built it first
        return identity_grid(shape, device, dtype)


def _sample_through(seen: SeenThroughAffine, u: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
    positions = _cached_identity(tuple(u.shape[2:]), u.device, u.dtype) + u
    # the map's rows scaled to grid_sample's [-1, 1] coordinates: on the 3 x 4 matrix, not on the volume
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in seen.image.shape[2:]], device=u.device, dtype=u.dtype)
    matrix = seen.index_map.to(u.device, u.dtype) * scale.view(3, 1)
    index = torch.einsum("ij,bj...->bi...", matrix[:, :3], positions) + (matrix[:, 3] - 1.0).view(1, 3, 1, 1, 1)
    grid = index.flip(1).permute(0, 2, 3, 4, 1)  # (x, y, z) order
    return F.grid_sample(seen.image.to(u.dtype), grid, mode=mode, padding_mode=padding, align_corners=True)


def warp(
    image: torch.Tensor | SeenThroughAffine, u: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"
) -> torch.Tensor:
    """Sample ``image`` at ``x + u(x)``. ``mode`` is ``"bilinear"`` (trilinear) or ``"nearest"``."""
    if isinstance(image, SeenThroughAffine):
        if image.shape != tuple(u.shape[2:]):
            raise ValueError(f"image grid {image.shape} and field grid {tuple(u.shape[2:])} differ")
        return _sample_through(image, u, mode, padding)
    if image.shape[2:] != u.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} and field grid {tuple(u.shape[2:])} differ")
    if u.shape[1] != 3:
        raise ValueError(f"a displacement field has 3 channels, got {u.shape[1]}")
    if not u.requires_grad and not u.any():  # identity: the image bit for bit (normalised coordinates round off)
        return image.clone()
    grid = _normalised_grid(u.to(image.dtype) if image.is_floating_point() else u)
    src = image if image.is_floating_point() else image.to(u.dtype)
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding, align_corners=True)
    return out if image.is_floating_point() else out.round().to(image.dtype)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi_a o phi_b``: ``x -> x + b(x) + a(x + b(x))`` (apply ``b`` first)."""
    return b + warp(a, b, padding="border")


def integrate(v: torch.Tensor, steps: int = DEFAULT_INTEGRATION_STEPS) -> torch.Tensor:
    """``exp(v)`` by scaling and squaring: the displacement of the flow of a stationary velocity field."""
    if steps < 0:
        raise ValueError("integration steps must be >= 0")
    u = v / (2**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def resize_field(u: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resample a voxel-unit field to another grid covering the same extent, rescaling its magnitudes.

    Grids are related voxel-centre to voxel-centre (``align_corners=False``), as in a stride-2 pyramid,
    so component ``c`` is multiplied by ``new_size / old_size`` along axis ``c``.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(u.shape[2:]) == shape:
        return u
    factors = torch.tensor([n / o for n, o in zip(shape, u.shape[2:])], device=u.device, dtype=u.dtype)
    out = F.interpolate(u, size=shape, mode="trilinear", align_corners=False)
    return out * factors.view(1, 3, 1, 1, 1)


def inverse(v: torch.Tensor, steps: int = DEFAULT_INTEGRATION_STEPS) -> torch.Tensor:
    """Displacement of ``exp(v)^-1 = exp(-v)``."""
    return integrate(-v, steps)
