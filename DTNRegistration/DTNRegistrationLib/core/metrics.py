"""Registration quality: Dice overlap, Jacobian determinant, folding, SDlogJ (numpy, spacing-aware)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch


def dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice per label of two integer label maps; labels default to every non-zero label of either map.

    A label absent from both maps scores NaN (undefined), not 1.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    counts = _label_counts(a, b)
    if labels is None:
        labels = sorted(set(counts) - {0}) if counts is not None else sorted((_present(a) | _present(b)) - {0})
    out = {}
    for lab in labels:
        if counts is not None:
            in_a, in_b, both = counts.get(int(lab), (0, 0, 0))
        else:
            ia, ib = a == lab, b == lab
            in_a, in_b, both = int(ia.sum()), int(ib.sum()), int(np.logical_and(ia, ib).sum())
        denom = in_a + in_b
        out[int(lab)] = float(2.0 * both / denom) if denom else float("nan")
    return out


def _present(a: np.ndarray) -> set:
    """The values of a label map (a histogram for small non-negative integers: no sort)."""
    if _histogram_labels(a):
        return set(np.flatnonzero(np.bincount(a.ravel())).tolist())
    return set(np.unique(a).tolist())


def _label_counts(a: np.ndarray, b: np.ndarray) -> dict[int, tuple[int, int, int]] | None:
    """Voxels of each label in ``a``, in ``b`` and in both, by three histograms: one pass over the maps instead
    of three per label (a 1 mm FreeSurfer map has ~40 labels). None for maps that are not small non-negative
    integers."""
    if not (_histogram_labels(a) and _histogram_labels(b)):
        return None
    a, b = a.ravel(), b.ravel()
    length = max(int(a.max()), int(b.max())) + 1
    in_a, in_b = np.bincount(a, minlength=length), np.bincount(b, minlength=length)
    both = np.bincount(a[a == b], minlength=length)
    present = np.flatnonzero(in_a + in_b)
    return {int(k): (int(in_a[k]), int(in_b[k]), int(both[k])) for k in present}


def _histogram_labels(a: np.ndarray) -> bool:
    """Whether ``a`` can be counted by ``np.bincount``: non-empty, integers from 0 to below 2^20."""
    return bool(np.issubdtype(a.dtype, np.integer) and a.size and 0 <= a.min() and a.max() < 2**20)


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> float:
    """Mean Dice over labels present in either map."""
    values = [v for v in dice(a, b, labels).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def label_dice(warped: np.ndarray, fixed: np.ndarray, moving: np.ndarray) -> dict[int, float]:
    """Dice per label of a registration: the warped moving labels against the fixed labels.

    The convention of every face (``report.json``, ``dtnreg evaluate``, the batch summary): the labels are every
    non-zero label of the fixed or the moving map (their union). A structure only one image has cannot be aligned
    and scores 0; one that the warp made vanish from both scores NaN and is left out of means.
    """
    fixed, moving = np.asarray(fixed), np.asarray(moving)
    labels = sorted((_present(fixed) | _present(moving)) - {0})
    return dice(warped, fixed, labels)


def jacobian_determinant(u: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """``det(I + du/dx)`` of a displacement field on an axis-aligned grid.

    ``u`` has shape ``(3, D, H, W)``, channel ``c`` along array axis ``c``, in the same length unit as
    ``spacing`` (voxel units with unit spacing, or millimetres with the grid's spacing per array axis).
    Derivatives are central differences inside and one-sided at the borders (``np.gradient``).
    """
    u = np.asarray(u)
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"expected a (3, D, H, W) field, got shape {u.shape}")
    _check_thick(u.shape[1:])
    grad = np.empty(u.shape[1:] + (3, 3), np.float64)
    for c in range(3):
        for axis, g in enumerate(np.gradient(u[c].astype(np.float64), *[float(s) for s in spacing])):
            grad[..., c, axis] = g
    return _det_identity_plus(grad)


def physical_jacobian_determinant(
    field: np.ndarray, spacing: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """``det(I + dD/dX)`` of an ITK displacement field on any (oblique, flipped) grid, as float32.

    ``field`` is ``sitk.GetArrayFromImage`` of a vector image: shape ``(K, J, I, 3)``, components x, y, z in
    mm. Index derivatives are mapped to physical ones through the grid's direction and spacing:
    ``dD/dX = dD/d(i, j, k) @ inv(direction @ diag(spacing))``.
    """
    field = np.asarray(field)
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f"expected a (K, J, I, 3) vector field, got shape {field.shape}")
    _check_thick(field.shape[:3])
    to_physical = torch.from_numpy(np.linalg.inv(np.reshape(direction, (3, 3)) @ np.diag(spacing)).astype(np.float32))
    out = torch.empty(field.shape[:3], dtype=torch.float32)
    # Slabs of a few K-slices (plus one slice of halo each side, so interior derivatives stay central): the
    # temporaries stay in cache; 3-4x faster than the whole volume at once on a 1 mm brain, same values. Each slab
    # is converted to float32 on its own, so a float64 field is never copied whole.
    for start in range(0, field.shape[0], JACOBIAN_SLAB):
        stop = min(field.shape[0], start + JACOBIAN_SLAB)
        low, high = max(0, start - 1), min(field.shape[0], stop + 1)
        block = torch.from_numpy(np.ascontiguousarray(field[low:high], dtype=np.float32))
        keep = slice(start - low, stop - low)
        dk, dj, di = torch.gradient(block, dim=(0, 1, 2))  # K >= 2 (checked), so every block has 2+ slices
        grad_index = torch.stack([di[keep], dj[keep], dk[keep]], dim=-1)  # [..., component, index axis i/j/k]
        out[start:stop] = _det_identity_plus(grad_index @ to_physical)
    return out.numpy()


JACOBIAN_SLAB = 4  # K-slices per block of physical_jacobian_determinant


def _check_thick(shape: Sequence[int]) -> None:
    if min(shape) < 2:
        raise ValueError("a field needs at least 2 voxels along every axis for a Jacobian")


def _det_identity_plus(grad: np.ndarray) -> np.ndarray:
    """Determinant of ``I + grad`` for a stack of 3x3 matrices (last two axes)."""
    g = grad
    a, b, c = g[..., 0, 0] + 1, g[..., 0, 1], g[..., 0, 2]
    d, e, f = g[..., 1, 0], g[..., 1, 1] + 1, g[..., 1, 2]
    h, i, k = g[..., 2, 0], g[..., 2, 1], g[..., 2, 2] + 1
    return a * (e * k - f * i) - b * (d * k - f * h) + c * (d * i - e * h)


def folding(jac: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, float]:
    """Count and percentage of voxels whose Jacobian determinant is <= 0 (inside ``mask`` if given)."""
    jac = np.asarray(jac)
    if mask is None:
        count, total = int(np.count_nonzero(jac <= 0)), jac.size
    else:
        region = np.asarray(mask, bool)
        count, total = int(np.count_nonzero((jac <= 0) & region)), int(np.count_nonzero(region))
    return count, (100.0 * count / total if total else 0.0)


def sd_log_jacobian(jac: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of ``log(det J)``, with det J clipped to [1e-9, 1e9] so folds stay finite.

    In chunks of about a million values, merged exactly (Chan et al.'s pairwise update): no full-size float64
    copies, so a 0.5 mm field (88 M voxels) costs what eight 1 mm ones do (docs/benchmarks.md, section 4).
    """
    values = np.asarray(jac)
    values = values.ravel() if mask is None else values[np.asarray(mask, bool)]
    count, mean, squares = 0, 0.0, 0.0
    for start in range(0, values.size, SD_CHUNK):
        chunk = np.log(np.clip(values[start : start + SD_CHUNK].astype(np.float64), 1e-9, 1e9))
        n, chunk_mean = chunk.size, float(chunk.mean())
        chunk_squares = float(np.square(chunk - chunk_mean).sum())
        delta, total = chunk_mean - mean, count + n
        mean += delta * n / total
        squares += chunk_squares + delta * delta * count * n / total
        count = total
    return math.sqrt(squares / count) if count else float("nan")


SD_CHUNK = 2**20  # values per chunk of sd_log_jacobian
