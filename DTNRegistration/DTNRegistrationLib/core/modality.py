"""Contrast-independent refinement similarities, and the test that turns one on (``auto``).

- NGF, normalised gradient fields (Haber and Modersitzki, 2006): 1 - mean (n_w . n_f)^2 with n the image gradient
  over sqrt(|grad|^2 + eps^2). It asks edges to be parallel, whatever their sign or strength, so a T2-weighted and
  a T1-weighted image of the same anatomy agree. ``auto``'s choice: on the development pairs it measured best
  (docs/cross-contrast.md). The fixed image's field is computed once per level; the warped moving
  image's at every step (three differences of one warped channel).
- MIND-SSC (Heinrich et al., MICCAI 2013): at every voxel, 12 self-similarity channels, the box-filtered squared
  differences between the 12 pairs of six-neighbourhood voxels that are sqrt(2) apart (at ``dilation`` voxels),
  normalised by their local variance and mapped through exp(-x). Computed once per image and level; refinement warps
  the moving image's descriptors (one 12-channel warp a step) and compares them with the fixed image's by their mean
  squared difference. Measured second (better than NGF on the PD-like pairs only), kept as ``mind``.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

NGF_EPS = 0.02  # gradient magnitude (per voxel, images normalised to [0, 1]) below which an edge counts as noise
NGF_REACH = 3  # the voxels (a cube's side) a gradient depends on
MIND_CHANNELS = 12
MIND_NOISE_FLOOR = 0.3  # the local variance's floor, as a share of its mean over the image (see mind_ssc)
MIND_REACH = 7  # the voxels (a cube's side) a descriptor depends on: 2 * (dilation + radius) + 1 at the defaults
# auto: of the dependence between the two images' intensities at corresponding points (after the affine, on the
# foreground; eta, the correlation ratio of the fixed ranks given the moving ones), the share an increasing mapping
# explains (rho, Spearman's rank correlation): rho / eta. Same-contrast pairs of the development data measured 0.87
# to 0.99, T2-, FLAIR- and PD-like ones -0.89 to 0.03 (docs/cross-contrast.md). The rank
# correlation alone failed: 0.37 to 0.46 for T1 pairs with the ROBEX scan, 0.02 for FLAIR-like against T1.
AUTO_INCREASING_SHARE = 0.5
AUTO_MIN_DEPENDENCE = 0.1  # below this eta nothing can be told (images unrelated, or misaligned)
AUTO_BINS = 64
AUTO_SAMPLES = 200_000
CROSS_CONTRAST = "ngf"  # what auto picks when the contrasts differ


def normalised_gradient(image: torch.Tensor, eps: float = NGF_EPS) -> torch.Tensor:
    """``(B, 3, D, H, W)``: the gradient of a one-channel image (central differences, voxel units) over
    sqrt(|gradient|^2 + eps^2)."""
    if image.shape[1] != 1:
        raise ValueError(f"a normalised gradient field needs a one-channel image, got {image.shape[1]} channels")
    gradient = torch.stack(torch.gradient(image[:, 0], dim=(1, 2, 3)), dim=1)
    return gradient / torch.sqrt((gradient * gradient).sum(dim=1, keepdim=True) + eps * eps)


def ngf_distance(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - mean squared cosine of the two images' normalised gradients (0: every edge parallel). ``fixed`` is an
    image or its precomputed :func:`normalised_gradient`; ``warped`` is an image."""
    fixed_field = normalised_gradient(fixed) if fixed.shape[1] == 1 else fixed
    dot = (normalised_gradient(warped) * fixed_field).sum(dim=1, keepdim=True)
    return 1.0 - _masked_mean(dot * dot, mask)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    weight = mask.to(x.dtype)
    return (x * weight).sum() / weight.sum().clamp_min(1.0)


def _ssc_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(12, 1, 3, 3, 3): +1 and -1 at the two voxels of each pair of six-neighbours sqrt(2) apart."""
    centre = np.array([1, 1, 1])
    neighbours = [centre + sign * np.eye(3, dtype=int)[axis] for axis in range(3) for sign in (-1, 1)]
    pairs = [(a, b) for a, b in itertools.combinations(neighbours, 2) if ((a - b) ** 2).sum() == 2]
    kernel = torch.zeros(len(pairs), 1, 3, 3, 3, device=device, dtype=dtype)
    for channel, (a, b) in enumerate(pairs):
        kernel[channel, 0, a[0], a[1], a[2]] = 1.0
        kernel[channel, 0, b[0], b[1], b[2]] = -1.0
    return kernel


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, floor: float | None = None) -> torch.Tensor:
    """MIND-SSC descriptors ``(B, 12, D, H, W)`` of a ``(B, 1, D, H, W)`` image (differentiable)."""
    if image.shape[1] != 1:
        raise ValueError(f"MIND-SSC needs a one-channel image, got {image.shape[1]} channels")
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    diff = F.conv3d(padded, _ssc_kernel(image.device, image.dtype), dilation=dilation)
    window = 2 * radius + 1
    ssd = F.avg_pool3d(F.pad(diff * diff, (radius,) * 6, mode="replicate"), window, stride=1)
    ssd = ssd - ssd.amin(dim=1, keepdim=True)
    # local variance estimate; its floor, a share of the image's mean, keeps the noise of flat tissue from being
    # blown up into descriptors that differ between any two scans (Heinrich's 1e-3 left them random here)
    variance = ssd.mean(dim=1, keepdim=True)
    level = float(variance.mean().detach().clamp_min(1e-12))
    floor = MIND_NOISE_FLOOR if floor is None else floor
    return torch.exp(-ssd / variance.clamp(min=level * floor, max=level * 1e3))


def descriptor_distance(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of two descriptor stacks over channels and (masked) voxels."""
    return _masked_mean((warped - fixed).pow(2).mean(dim=1, keepdim=True), mask)


def intensity_dependence(moving: np.ndarray, fixed: np.ndarray, region: np.ndarray, seed: int = 0):
    """``(rho, eta)`` of the two images' intensities at the voxels of ``region`` (a fixed-seed sample of at most
    ``AUTO_SAMPLES``): Spearman's rank correlation, and the correlation ratio of the fixed ranks given the moving
    ones in ``AUTO_BINS`` quantile bins (how much any mapping explains). NaN when it cannot be told."""
    index = np.flatnonzero(region.ravel())
    if index.size > AUTO_SAMPLES:
        index = np.random.default_rng(seed).choice(index, AUTO_SAMPLES, replace=False)
    ranks_m, ranks_f = _ranks(moving.ravel()[index]), _ranks(fixed.ravel()[index])
    if index.size < 10 * AUTO_BINS or ranks_m.std() == 0 or ranks_f.std() == 0:
        return float("nan"), float("nan")
    rho = float(np.corrcoef(ranks_m, ranks_f)[0, 1])
    edges = np.quantile(ranks_m, np.linspace(0, 1, AUTO_BINS + 1))
    bins = np.clip(np.searchsorted(edges, ranks_m, side="right") - 1, 0, AUTO_BINS - 1)
    means = np.bincount(bins, ranks_f, AUTO_BINS) / np.maximum(np.bincount(bins, minlength=AUTO_BINS), 1)
    eta = float(np.sqrt(np.var(means[bins]) / np.var(ranks_f)))
    return rho, eta


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank: the many equal background and clipped voxels)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], sorted_values.size]
    mean_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def choose_similarity(moving: np.ndarray, fixed: np.ndarray, region: np.ndarray, default: str) -> tuple[str, str]:
    """``auto``'s choice for a pair on one grid (after the affine): ``(CROSS_CONTRAST, why)`` when the intensities
    at corresponding points of ``region`` are not mostly increasing in each other, else ``(default, why)``."""
    rho, eta = intensity_dependence(moving, fixed, region)
    if not np.isfinite(rho) or not eta >= AUTO_MIN_DEPENDENCE:
        return default, "auto: too little intensity dependence on the common foreground to compare the contrasts"
    share = rho / eta
    measured = f"increasing share {share:.2f} (rank correlation {rho:.2f} / correlation ratio {eta:.2f})"
    if share < AUTO_INCREASING_SHARE:
        return CROSS_CONTRAST, f"auto: {measured} < {AUTO_INCREASING_SHARE}, contrasts differ"
    return default, f"auto: {measured} >= {AUTO_INCREASING_SHARE}, same contrast"


__all__ = [
    "AUTO_INCREASING_SHARE",
    "CROSS_CONTRAST",
    "MIND_CHANNELS",
    "MIND_REACH",
    "choose_similarity",
    "descriptor_distance",
    "mind_ssc",
    "ngf_distance",
    "normalised_gradient",
    "intensity_dependence",
]
