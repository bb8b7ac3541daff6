"""Similarity and regularisation terms for unsupervised (and label-supervised) registration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import modality, spatial


def l1(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference: the paper's similarity term."""
    diff = (warped - fixed).abs()
    return _masked_mean(diff, mask)


def mse(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference."""
    return _masked_mean((warped - fixed) ** 2, mask)


def local_ncc(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    window: int = 9,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    fixed_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One minus the mean squared local normalised cross-correlation over cubic windows (0 = identical).

    ``fixed_stats`` (from :func:`ncc_fixed_statistics`) saves recomputing the fixed image's local mean and variance
    at every step of an optimisation on one pair.
    """
    if window % 2 == 0:
        raise ValueError(f"the NCC window must be odd, got {window}")
    mu_f, var_f = fixed_stats if fixed_stats is not None else ncc_fixed_statistics(fixed, window)
    # the local means in one separable box filter (about 30x faster than a dense 9^3 convolution on a CPU)
    stacked = torch.cat([warped, warped * warped, warped * fixed], dim=1)
    mu_w, ww, wf = _box_mean(stacked, window).split(warped.shape[1], dim=1)
    var_w = (ww - mu_w**2).clamp_min(0)
    cov = wf - mu_w * mu_f
    cc = cov * cov / (var_w * var_f + eps)
    return 1.0 - _masked_mean(cc, mask)


def ncc_fixed_statistics(fixed: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed image's local mean and variance over ``window``-cubes (what :func:`local_ncc` needs of it)."""
    mu_f, ff = _box_mean(torch.cat([fixed, fixed * fixed], dim=1), window).split(fixed.shape[1], dim=1)
    return mu_f, (ff - mu_f**2).clamp_min(0)


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a cubic window truncated at the borders: per axis, a sum of ``window`` shifted slices of the
    zero-padded volume, then one division by the number of voxels each window holds.

    The same values as three 1-D ``avg_pool3d`` (to 2e-7), 2.4x faster forward and backward on a CPU (a 2 mm
    refinement step: about 80 ms less, docs/benchmarks.md).
    """
    p = window // 2
    count = torch.ones((), dtype=x.dtype, device=x.device)
    for axis in (2, 3, 4):
        n = x.shape[axis]
        padding = [0] * 6
        padding[2 * (4 - axis)] = padding[2 * (4 - axis) + 1] = p  # F.pad lists the last axis first
        padded = F.pad(x, padding)
        x = padded.narrow(axis, 0, n) + padded.narrow(axis, 1, n)
        for k in range(2, window):
            x = x + padded.narrow(axis, k, n)
        shape = [1] * 5
        shape[axis] = n
        count = count * _window_counts(n, p).to(x).view(shape)
    return x / count


def _window_counts(n: int, p: int) -> torch.Tensor:
    """How many of ``n`` voxels a window of radius ``p`` holds at each position (fewer at the borders)."""
    index = torch.arange(n)
    return (torch.clamp(index + p, max=n - 1) - torch.clamp(index - p, min=0) + 1).float()


def gradient_smoothness(v: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """``||grad v||^2``: mean squared forward difference of every component along every axis
    (a scalar, or one value per sample ``(B,)`` so that each pair can have its own alpha)."""
    diffs = [v[:, :, 1:] - v[:, :, :-1], v[:, :, :, 1:] - v[:, :, :, :-1], v[:, :, :, :, 1:] - v[:, :, :, :, :-1]]
    terms = [d.pow(2).flatten(1).mean(1) if per_sample else d.pow(2).mean() for d in diffs]
    return sum(terms) / 3.0


def dice_loss(warped_onehot: torch.Tensor, fixed_onehot: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """One minus the mean soft Dice over label channels (channel 0, background, is left out)."""
    dims = (2, 3, 4)
    a, b = warped_onehot[:, 1:], fixed_onehot[:, 1:]
    inter = (a * b).sum(dims)
    denom = a.sum(dims) + b.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def mind(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MIND-SSC descriptor distance (``modality``): contrast-independent. One-channel images get their descriptors
    computed here; descriptor stacks (from :func:`prepare_similarity`) are compared as they are."""
    if warped.shape[1] == 1:
        warped, fixed = modality.mind_ssc(warped), modality.mind_ssc(fixed)
    return modality.descriptor_distance(warped, fixed, mask)


def ngf(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised gradient fields (``modality``): contrast-independent; ``fixed`` may be its precomputed field."""
    return modality.ngf_distance(warped, fixed, mask)


SIMILARITIES = {"l1": l1, "mse": mse, "ncc": local_ncc, "ngf": ngf, "mind": mind}


def prepare_similarity(
    similarity: str, moving: torch.Tensor, fixed: torch.Tensor, window: int = 9, moving_mask: torch.Tensor | None = None
):
    """What an optimisation on one pair compares, computed once: ``(moving, fixed, fixed_stats)`` for
    :func:`registration_objective`. NCC: the fixed image's local statistics; NGF: the fixed image's normalised
    gradient field; MIND: both images' descriptors (the objective then warps the moving descriptors, far cheaper
    than computing them anew at every step). Where
    ``moving_mask`` is 0 the moving image is first filled in from its surroundings (:func:`fill_left_out`)."""
    if isinstance(moving, spatial.SeenThroughAffine) and (moving_mask is not None or similarity == "mind"):
        moving = moving.on_grid()  # filled in, or described, on the grid the objective compares on
    if moving_mask is not None:
        moving = fill_left_out(moving, moving_mask)
    if similarity == "ncc":
        return moving, fixed, ncc_fixed_statistics(fixed, window)
    if similarity == "ngf":
        return moving, modality.normalised_gradient(fixed), None
    if similarity == "mind":
        return modality.mind_ssc(moving), modality.mind_ssc(fixed), None
    return moving, fixed, None


def fill_left_out(image: torch.Tensor, mask: torch.Tensor, max_passes: int = 64) -> torch.Tensor:
    """``image`` with the voxels where ``mask`` is 0 replaced by the mean of their kept neighbours, one voxel layer a
    pass (the rest, if any, by the kept mean). Excluding a region from the similarity is not enough: its edge (a dark
    cavity, the zeros beyond a slab) would still pull the tissue around it across; filled in, it has no edge."""
    keep = (mask > 0.5).to(image.dtype).expand_as(image)
    if bool(keep.all()) or not bool(keep.any()):
        return image
    values = image * keep
    for _ in range(max_passes):
        total = F.avg_pool3d(values, 3, stride=1, padding=1)
        count = F.avg_pool3d(keep, 3, stride=1, padding=1)
        grow = (keep == 0) & (count > 0)
        values = torch.where(grow, total / count.clamp_min(1e-12), values)
        keep = torch.where(grow, torch.ones_like(keep), keep)
        if bool(keep.all()):
            return values
    mean = (values * keep).sum() / keep.sum()
    return torch.where(keep > 0, values, mean)


# Below this Jacobian determinant a voxel counts against the deformation (a margin before it folds at 0).
FOLDING_THRESHOLD = 0.1


def registration_objective(
    v: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    *,
    alpha: float | torch.Tensor,
    similarity: str = "ncc",
    window: int = 9,
    mask: torch.Tensor | None = None,
    integration_steps: int = 7,
    fixed_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    moving_mask: torch.Tensor | None = None,
    folding_weight: float = 0.0,
) -> torch.Tensor:
    """The paper's loss: ``similarity(moving o exp(v), fixed) + alpha * ||grad v||^2``
    (+ ``folding_weight`` times :func:`folding_penalty` of exp(v), which test-time refinement adds).

    ``v`` is a velocity in voxels of its own grid (possibly coarser than the images'); ``alpha`` a float or one
    value per pair of the batch; ``window`` is the NCC window and ``fixed_stats`` its precomputed fixed-image
    statistics (both ignored by L1 and MSE). ``moving_mask`` (on the moving image's grid) leaves out of the
    similarity the fixed points whose warped mask is 0 (a cavity, beyond the moving field of view); the weight is
    not differentiated, so the deformation cannot lower the loss by moving the mask.
    """
    flow = spatial.integrate(v, integration_steps)
    u = spatial.resize_field(flow, tuple(fixed.shape[2:]))
    warped = spatial.warp(moving, u)
    if moving_mask is not None:
        weight = spatial.warp(moving_mask.to(u.dtype), u.detach())
        # minus the voxels whose NCC window or MIND patch reaches into the left-out region
        reach = {"ncc": window, "ngf": modality.NGF_REACH, "mind": modality.MIND_REACH}.get(similarity, 1)
        if reach > 1:
            weight = -F.max_pool3d(-weight, reach, stride=1, padding=reach // 2)
        mask = weight if mask is None else mask * weight
    if similarity == "ncc":
        sim = local_ncc(warped, fixed, window, mask, fixed_stats=fixed_stats)
    else:
        sim = _lookup(similarity)(warped, fixed, mask)
    loss = paper_loss(sim, v, alpha)[0]
    return loss + folding_weight * folding_penalty(flow) if folding_weight else loss


def paper_loss(sim: torch.Tensor, v: torch.Tensor, alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sim + alpha * ||grad v||^2`` (Eq. 2 of the paper) and the smoothness term per pair.

    The one place where the two terms meet: the test-time objective above and the training loss
    (``train.steps.compute_loss``) both end here. ``alpha`` is a float or one value per pair of the batch.
    """
    smooth = gradient_smoothness(v, per_sample=True)
    return sim + (torch.as_tensor(alpha, device=v.device, dtype=v.dtype) * smooth).mean(), smooth


def folding_penalty(u: torch.Tensor, threshold: float = FOLDING_THRESHOLD) -> torch.Tensor:
    """Mean over the grid of ``max(0, threshold - det J)``, J the Jacobian of ``x -> x + u(x)`` in voxel units.

    Forward differences: the Jacobian of the trilinear interpolation of ``u`` at each cell's first corner, so a
    field without penalty stays unfolded when it is brought onto a finer grid.
    """
    d = [u[:, :, 1:, :-1, :-1], u[:, :, :-1, 1:, :-1], u[:, :, :-1, :-1, 1:]]
    base = u[:, :, :-1, :-1, :-1]
    # j[i][k] = delta_ik + d u_i / d x_k (channel i is array axis i)
    j = [[(d[k][:, i] - base[:, i]) + (1.0 if i == k else 0.0) for k in range(3)] for i in range(3)]
    det = (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )
    return F.relu(threshold - det).mean()


def similarity(name: str):
    """The similarity function called ``name`` (``l1``, ``mse``, ``ncc``, ``ngf`` or ``mind``)."""
    return _lookup(name)


def _lookup(name: str):
    try:
        return SIMILARITIES[name]
    except KeyError:
        raise ValueError(f"unknown similarity {name!r}; choose one of {sorted(SIMILARITIES)}") from None


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``x`` over the grid, counting only the mask's voxels (zeros elsewhere).

    Dividing by the whole grid, not by the mask's size, keeps the similarity's weight against the smoothness term
    the same with or without a mask: dividing by the mask's size made it 2-3x stronger on brain masks, and the
    2 mm development pairs then folded on 0.02-0.05 % of the brain (docs/benchmarks.md).
    """
    if mask is None:
        return x.mean()
    return (x * mask.to(x.dtype).expand_as(x)).sum() / x.numel()
