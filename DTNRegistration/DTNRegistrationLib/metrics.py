"""Registration quality: Dice overlap, Jacobian determinant, folding, SDlogJ (numpy, spacing-aware)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice per label of two integer label maps; labels default to every non-zero label of either map.

    A label absent from both maps scores NaN (undefined), not 1.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    if labels is None:
        labels = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    out = {}
    for lab in labels:
        ia, ib = a == lab, b == lab
        denom = int(ia.sum()) + int(ib.sum())
        out[int(lab)] = float(2.0 * np.logical_and(ia, ib).sum() / denom) if denom else float("nan")
    return out


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> float:
    """Mean Dice over labels present in either map."""
    values = [v for v in dice(a, b, labels).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def jacobian_determinant(u: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """``det(I + du/dx)`` of a displacement field.

    ``u`` has shape ``(3, D, H, W)``, channel ``c`` along array axis ``c``, in the same length unit as
    ``spacing`` (voxel units with unit spacing, or millimetres with the grid's spacing per array axis).
    Derivatives are central differences inside and one-sided at the borders (``np.gradient``).
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"expected a (3, D, H, W) field, got shape {u.shape}")
    if min(u.shape[1:]) < 2:
        raise ValueError("a field needs at least 2 voxels along every axis for a Jacobian")
    grad = np.empty((3, 3) + u.shape[1:])
    for c in range(3):
        for ax, g in enumerate(np.gradient(u[c], *[float(s) for s in spacing])):
            grad[c, ax] = g
    grad[0, 0] += 1.0
    grad[1, 1] += 1.0
    grad[2, 2] += 1.0
    return (
        grad[0, 0] * (grad[1, 1] * grad[2, 2] - grad[1, 2] * grad[2, 1])
        - grad[0, 1] * (grad[1, 0] * grad[2, 2] - grad[1, 2] * grad[2, 0])
        + grad[0, 2] * (grad[1, 0] * grad[2, 1] - grad[1, 1] * grad[2, 0])
    )


def folding(jac: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, float]:
    """Count and percentage of voxels whose Jacobian determinant is <= 0 (inside ``mask`` if given)."""
    jac = np.asarray(jac)
    region = np.ones(jac.shape, bool) if mask is None else np.asarray(mask, bool)
    count = int(np.logical_and(jac <= 0, region).sum())
    total = int(region.sum())
    return count, (100.0 * count / total if total else 0.0)


def sd_log_jacobian(jac: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of ``log(det J)``, with det J clipped to [1e-9, 1e9] so folds stay finite."""
    values = np.log(np.clip(np.asarray(jac, np.float64), 1e-9, 1e9))
    if mask is not None:
        values = values[np.asarray(mask, bool)]
    return float(values.std())
