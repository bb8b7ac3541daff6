"""What ``dtnreg evaluate`` measures on one output: Dice and HD95 per structure, folding and SDlogJ of the map."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (the image border counts as outside)."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _distance_to(target: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance (mm) from every voxel to the nearest voxel of ``target`` (exact, Maurer)."""
    image = sitk.GetImageFromArray(target.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayFromImage(distance))


def hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between the surfaces of two masks.

    ``max(P95 of d(x, surface B) over x on surface A, P95 of d(y, surface A) over y on surface B)`` with voxel
    centres as points, numpy's linear-interpolation percentile and ``spacing`` in SimpleITK's (x, y, z) order
    for arrays indexed (k, j, i). NaN when either mask is empty. Computed in the masks' joint bounding box.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() or not b.any():
        return float("nan")
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(a | b))
    sa, sb = surface(a[box]), surface(b[box])
    to_a, to_b = _distance_to(sa, spacing), _distance_to(sb, spacing)
    return float(max(np.percentile(to_b[sa], 95), np.percentile(to_a[sb], 95)))


def score(output, pair) -> dict:
    """Dice and HD95 per structure, folding and SDlogJ of one method's output on one pair."""
    from ..core import metrics

    jac = jacobian(output, pair)
    region = None if pair.mask is None else sitk.GetArrayViewFromImage(pair.mask) > 0
    count, percent = metrics.folding(jac, region)
    values = jac if region is None else jac[region]
    record = {
        "folding_count": count,
        "folding_percent": percent,
        "folding_region_voxels": int(values.size),
        "sd_log_jacobian": metrics.sd_log_jacobian(jac, region),
        "jacobian_min": float(values.min()),
        "structures": {},
        "mean_dice": None,
        "mean_hd95_mm": None,
    }
    if output.warped_labels is not None and pair.fixed_labels is not None:
        record.update(_label_scores(output.warped_labels, pair))
    return record


def jacobian(output, pair) -> np.ndarray:
    """det J of the output's map on the fixed grid: the method's own when it has one, else from the field."""
    from ..core import metrics

    if output.jacobian is not None:
        return np.asarray(output.jacobian)
    field = sitk.GetArrayViewFromImage(output.displacement)
    return metrics.physical_jacobian_determinant(field, pair.fixed.GetSpacing(), pair.fixed.GetDirection())


def _label_scores(warped_labels: sitk.Image, pair) -> dict:
    from ..core import metrics

    warped = sitk.GetArrayViewFromImage(warped_labels)
    target = sitk.GetArrayViewFromImage(pair.fixed_labels)
    moving = sitk.GetArrayViewFromImage(pair.moving_labels)
    dice = metrics.label_dice(warped, target, moving)
    spacing = pair.fixed.GetSpacing()
    structures = {}
    for label, d in dice.items():
        h = hd95(warped == label, target == label, spacing)
        structures[str(int(label))] = {"dice": _finite(d), "hd95_mm": _finite(h)}
    dices = [s["dice"] for s in structures.values() if s["dice"] is not None]
    hds = [s["hd95_mm"] for s in structures.values() if s["hd95_mm"] is not None]
    return {
        "structures": structures,
        "mean_dice": float(np.mean(dices)) if dices else None,
        "mean_hd95_mm": float(np.mean(hds)) if hds else None,
    }


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


__all__ = ["hd95", "jacobian", "score", "surface"]
