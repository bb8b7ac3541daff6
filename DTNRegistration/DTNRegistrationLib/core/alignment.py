"""The torch-free first half of a registration: checked inputs, foreground masks and the affine.

``register()`` calls :func:`align` itself; the command line calls it first, while torch and the weights load in
a background thread (about 0.5 s less a 1 mm pair on two cores, docs/benchmarks.md), and hands the result over.
Nothing here may import torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import SimpleITK as sitk

from ..errors import Cancelled, InputError
from . import imaging


@dataclass(frozen=True)
class Alignment:
    """Checked float32 images, their foregrounds, the fixed-to-moving affine (identity when switched off), and the
    seconds each step took."""

    moving: sitk.Image
    fixed: sitk.Image
    fixed_fg: sitk.Image
    moving_fg: sitk.Image
    transform: sitk.AffineTransform
    timings: dict = field(default_factory=dict)


def align(
    moving: sitk.Image,
    fixed: sitk.Image,
    *,
    moving_labels: sitk.Image | None = None,
    fixed_labels: sitk.Image | None = None,
    mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    affine: bool = True,
    rigid: bool = False,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Alignment:
    """Check the inputs (``InputError`` naming the problem) and find the affine start of the registration (with
    ``rigid``, a rotation and translation only)."""
    stages = Stages(progress, cancel)
    stages.begin("validate", 0.0, "checking inputs")
    moving, fixed = checked_inputs(moving, fixed, moving_labels, fixed_labels, mask)
    check_moving_mask(moving_mask, moving)
    stages.begin("affine", 0.05, "affine initialisation")
    fixed_fg = imaging.foreground_mask(fixed) if mask is None else sitk.Cast(mask > 0, sitk.sitkUInt8)
    moving_fg = moving_foreground(moving, moving_mask)
    transform = sitk.AffineTransform(3)
    if affine:
        transform = imaging.affine_initialisation(moving, fixed, fixed_fg, moving_mask=moving_fg, rigid=rigid)
    stages.end()
    return Alignment(moving, fixed, fixed_fg, moving_fg, transform, stages.timings)


class Stages:
    """Timing, progress and cancel checks for the stages of one registration (here and in ``register()``)."""

    def __init__(self, progress, cancel) -> None:
        self.progress, self.cancel, self.timings = progress, cancel, {}
        self._name, self._start = None, time.perf_counter()

    def begin(self, name: str, fraction: float, message: str) -> None:
        self.end()
        self.check_cancel()
        if self.progress is not None:
            self.progress(fraction, message)
        self._name, self._start = name, time.perf_counter()

    def end(self) -> None:
        if self._name is not None:
            self.timings[self._name] = round(time.perf_counter() - self._start, 3)
            self._name = None

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("registration cancelled")


def checked_inputs(moving, fixed, moving_labels=None, fixed_labels=None, mask=None) -> tuple[sitk.Image, sitk.Image]:
    """The two images as 3-D float32 scalar images; labels and mask checked against their grids."""
    checked = []
    for what, image in (("moving image", moving), ("fixed image", fixed)):
        if not isinstance(image, sitk.Image):
            raise InputError(f"{what}: expected a SimpleITK image, got {type(image).__name__}")
        image = imaging.squeeze_to_3d(image, what)
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{what}: has {image.GetNumberOfComponentsPerPixel()} components; expected a scalar")
        image = sitk.Cast(image, sitk.sitkFloat32)
        imaging.check_image(image, what)
        checked.append(image)
    moving, fixed = checked
    if moving_labels is not None:
        imaging.check_labels(moving_labels, "moving labels", moving)
    if fixed_labels is not None:
        imaging.check_labels(fixed_labels, "fixed labels", fixed)
    if mask is not None:
        imaging.check_labels(mask, "mask", fixed)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise InputError("mask: is empty (no voxel is set)")
    return moving, fixed


def check_moving_mask(moving_mask: sitk.Image | None, moving: sitk.Image) -> None:
    if moving_mask is None:
        return
    imaging.check_labels(moving_mask, "moving mask", moving)
    array = sitk.GetArrayViewFromImage(moving_mask)
    if not array.any():
        raise InputError("moving mask: is empty (no voxel is set); it marks the moving image's region to match")
    if array.all():
        raise InputError("moving mask: every voxel is set, so it leaves nothing out; give it 0 where to leave out")


def moving_foreground(moving: sitk.Image, moving_mask: sitk.Image | None) -> sitk.Image:
    """The moving head or brain (Otsu), without what the moving mask leaves out."""
    foreground = imaging.foreground_mask(moving)
    if moving_mask is None:
        return foreground
    return sitk.And(sitk.Cast(foreground > 0, sitk.sitkUInt8), sitk.Cast(moving_mask > 0, sitk.sitkUInt8))


__all__ = ["Alignment", "Stages", "align", "check_moving_mask", "checked_inputs", "moving_foreground"]
