"""A one-page PNG summary of a registration: fixed, moving, warped, Jacobian with folding, deformation grid."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from ..core.registration import RegistrationResult  # noqa: E402


def _axial(image: sitk.Image, index: int | None = None) -> np.ndarray:
    """An axial slice in radiological display (anterior up), whatever the file's orientation."""
    oriented = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(oriented)
    k = array.shape[0] // 2 if index is None else index
    return np.asarray(array[k])


def summary_figure(result: RegistrationResult, moving: sitk.Image, fixed: sitk.Image, path: str | os.PathLike) -> None:
    """Axial mid-slices on the fixed grid: the moving image after the affine alone, then after the whole map."""
    fixed_slice = _axial(fixed)
    affine = result.affine if result.affine is not None else sitk.AffineTransform(3)
    moving_affine = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    panels = [
        ("Fixed", fixed_slice, "gray"),
        ("Moving, affine only", _axial(moving_affine), "gray"),
        ("Warped moving", _axial(result.warped), "gray"),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.9))
    for ax, (title, data, cmap) in zip(axes, panels):
        ax.imshow(data, cmap=cmap)
        ax.set_title(title)
    jac = _axial(result.jacobian)
    fold = _axial(result.folding)
    axes[3].imshow(fixed_slice, cmap="gray")
    shown = axes[3].imshow(np.ma.masked_where(fixed_slice <= 0, jac), cmap="RdBu_r", vmin=0, vmax=2, alpha=0.8)
    ys, xs = np.nonzero(fold)
    axes[3].scatter(xs, ys, s=4, c="red", marker="s")
    axes[3].set_title(f"det J; folding (red): {result.metrics['folding_count']} voxels")
    fig.colorbar(shown, ax=axes[3], fraction=0.046)
    _grid_panel(axes[4], _nonlinear_part(result), fixed_slice)
    for ax in axes:
        ax.axis("off")
    dice = result.metrics.get("dice_mean")
    fig.suptitle(
        f"DTN registration ({result.model['name']}, alpha={result.alpha:g}, {result.device}, "
        f"{result.timings.get('total', 0):.1f} s)" + (f", mean Dice {dice:.3f}" if dice is not None else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _nonlinear_part(result: RegistrationResult) -> sitk.Image:
    """The displacement less its affine part, so the grid shows what the network changed."""
    if result.affine is None:
        return result.displacement
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(result.displacement)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.Subtract(result.displacement, to_field.Execute(result.affine))


def _grid_panel(ax, displacement: sitk.Image, background: np.ndarray, step: int = 4) -> None:
    """The deformation of a regular grid in the axial plane (in-plane components, in voxels)."""
    field = sitk.GetArrayFromImage(sitk.DICOMOrient(displacement, "LPS"))
    k = field.shape[0] // 2
    spacing = sitk.DICOMOrient(displacement, "LPS").GetSpacing()
    dx = field[k, :, :, 0] / spacing[0]
    dy = field[k, :, :, 1] / spacing[1]
    rows, cols = np.mgrid[0 : dx.shape[0], 0 : dx.shape[1]]
    x, y = cols + dx, rows + dy
    ax.imshow(background, cmap="gray", alpha=0.4)
    for r in range(0, x.shape[0], step):
        ax.plot(x[r], y[r], color="tab:orange", lw=0.6)
    for c in range(0, x.shape[1], step):
        ax.plot(x[:, c], y[:, c], color="tab:orange", lw=0.6)
    ax.set_xlim(0, background.shape[1])
    ax.set_ylim(background.shape[0], 0)
    ax.set_title("Deformation grid (non-linear part)")
