"""The one entry point of both faces: ``register(moving, fixed, ...) -> RegistrationResult``.

Data flow: affine initialisation in physical space -> both images onto the model's grid (LPS-aligned,
isotropic, sizes multiple of 16) -> DTN velocity (optionally refined) -> exp(v) -> the full fixed-to-moving
map on the fixed image's grid in mm, affine included -> warped image, labels, Jacobian, folding.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import Cancelled, InputError
from ..options import DEFAULT_PRESET, RegistrationOptions, check_device
from . import alignment, coverage, deformation, imaging, metrics, spatial
from .models import LoadedModel, load_model
from .network import to_device
from .refinement import PRESETS, Schedule, better_start, refine_schedule, single_level, velocity_shape
from .result import RegistrationResult

# Test-time refinement by default, coarse to fine: the shipped network is only a little better than the affine start
# alone (see its model card); the presets' schedules were chosen on the development pairs (docs/benchmarks.md).
# auto (options.DEFAULT_SIMILARITY): local NCC for pairs of one contrast, normalised gradient fields when the
# contrasts differ (modality.py; docs/cross-contrast.md).
SAME_CONTRAST_SIMILARITY = "ncc"
# Refinement and the output field use a grid of at most this spacing. A coarser network (4 mm trains eight
# times faster per step on a CPU) runs on its own grid and its velocity is brought onto this one.
WORK_SPACING_MM = 2.0


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an input error."""
    device = check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for, but no CUDA GPU is available to torch here; use --device cpu")
    return torch.device(device)


def register(
    moving: sitk.Image,
    fixed: sitk.Image,
    *,
    moving_labels: sitk.Image | None = None,
    fixed_labels: sitk.Image | None = None,
    mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    alpha: float | None = None,
    device: str = "auto",
    model: str | LoadedModel | None = None,
    refine: int | None = None,
    preset: str | None = None,
    refine_similarity: str | None = None,
    affine: bool = True,
    inverse: bool = True,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    prepared: alignment.Alignment | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``; see the module docstring and docs/engine-interfaces.md.

    The options (alpha to affine) are checked by :class:`~DTNRegistrationLib.options.RegistrationOptions`.
    ``prepared``: the result of ``alignment.align`` on the same inputs and ``affine`` option, made beforehand (the
    command line makes it while torch loads); the images and masks then come from it.
    """
    options = RegistrationOptions(
        alpha=alpha, device=device, preset=preset, refine=refine, refine_similarity=refine_similarity, affine=affine
    )
    torch_device = resolve_device(options.device)
    if prepared is None:
        inputs = dict(moving_labels=moving_labels, fixed_labels=fixed_labels, mask=mask, moving_mask=moving_mask)
        align_options = dict(affine=options.affine, rigid=options.rigid, progress=progress, cancel=cancel)
        prepared = alignment.align(moving, fixed, **inputs, **align_options)
    moving, fixed, fixed_fg, moving_fg = prepared.moving, prepared.fixed, prepared.fixed_fg, prepared.moving_fg
    transform = prepared.transform
    start = time.perf_counter()  # the total adds the alignment's own steps, made here or beforehand
    stages = alignment.Stages(progress, cancel)
    stages.timings.update(prepared.timings)
    stages.begin("load_model", 0.1, "loading model")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    cfg = loaded.config
    alpha = float(cfg.alpha if options.alpha is None else options.alpha)
    schedule = refinement_schedule(options.preset, options.refine).for_image_spacing(min(fixed.GetSpacing()))

    stages.begin("preprocess", 0.2, "resampling onto the model grid")
    reference = work_grid(fixed, fixed_fg, loaded.spacing_mm)
    fixed_norm = imaging.normalize_intensity(fixed, fixed_fg)
    moving_norm = imaging.normalize_intensity(moving, moving_fg)
    fixed_grid = imaging.resample(fixed_norm, reference)
    moving_grid = imaging.resample(moving_norm, reference, transform=transform)
    mask_grid = imaging.resample(sitk.Cast(mask > 0, sitk.sitkFloat32), reference) if mask is not None else None
    support = coverage.moving_support(moving, moving_fg, moving_mask, fixed_fg, reference, transform)
    similarity, similarity_note = coverage.resolve_similarity(
        options.refine_similarity, moving_grid, fixed_grid, support, SAME_CONTRAST_SIMILARITY
    )

    pair = _tensor(moving_grid, torch_device), _tensor(fixed_grid, torch_device)
    if schedule.network_start:
        stages.begin("network", 0.3, f"running {cfg.variant.upper()} on {torch_device.type}")
        passes = schedule.work_grid_passes
        velocity = _network_velocity(loaded, pair, (moving_norm, fixed_norm), reference, transform, alpha, passes)
        if velocity.device.type != torch_device.type:  # the network fell back to the CPU: so does everything after
            torch_device = velocity.device
            pair = tuple(t.to(torch_device) for t in pair)
    else:  # the preset starts from the alignment (velocity on the work grid's velocity grid, as the network's)
        velocity = torch.zeros(1, 3, *velocity_shape(pair[1].shape[2:], 2), device=torch_device)
    mask_t = None if mask_grid is None else similarity_region(_tensor(mask_grid, torch_device), reference)
    valid_t = torch.from_numpy(support.valid).to(torch_device)[None, None] if support.needed else None
    steps = loaded.config.integration_steps
    refine_alpha = schedule.refinement_alpha(alpha, similarity)
    origin = "alignment (this preset uses no network)"
    if schedule.network_start:
        velocity, origin = better_start(
            velocity,
            *pair,
            alpha=refine_alpha,
            similarity=similarity,
            mask=mask_t,
            integration_steps=steps,
            moving_mask=valid_t,
        )
    refine_info = {
        "start": origin,
        "preset": None if options.refine is not None else options.preset_name,
        "refine_steps": schedule.steps,
        "refine_levels_mm": schedule.spacings,
        "refine_alpha": refine_alpha,
        "refine_similarity": similarity_note,
        "moving_coverage_percent": support.coverage_percent,
        "warnings": list(support.warnings),
    }
    if schedule.steps:
        stages.begin("refine", 0.4, f"refining ({schedule.steps} steps)")
        levels = _pyramid(schedule, pair, reference, (moving_norm, fixed_norm), transform, torch_device)
        masks = (mask_t, valid_t)
        velocity, taken = _refine(velocity, levels, masks, refine_alpha, schedule, similarity, steps, stages)
        refine_info["refine_steps_taken"] = taken
        reference = _finest(reference, schedule)

    stages.begin("outputs", 0.85, "building the deformation on the fixed grid")
    with torch.inference_mode():
        shape = tuple(sitk.GetArrayViewFromImage(reference).shape)
        forward = loaded.model.displacement(velocity, shape)
        backward = loaded.model.displacement(velocity, shape, inverse=True) if inverse else None
    forward_field = deformation.field_image(forward, reference, deformation.corners(fixed))
    mapping = deformation.full_transform(forward_field, transform)  # warps and resamples without the full field
    displacement = deformation.field_of(mapping, fixed)
    inverse_map = None
    if backward is not None:
        moving_corners = deformation.corners(moving, transform.GetInverse())  # where the inverse field is evaluated
        inverse_field = deformation.field_image(backward, reference, moving_corners)
        inverse_map = deformation.full_map(inverse_field, transform.GetInverse(), moving, inverse=True)
    warped = sitk.Resample(moving, fixed, mapping, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    jac_array = metrics.physical_jacobian_determinant(
        sitk.GetArrayViewFromImage(displacement), fixed.GetSpacing(), fixed.GetDirection()
    )
    jacobian = _like(jac_array, fixed)
    folding = _like((jac_array <= 0).astype(np.uint8), fixed)

    stages.begin("labels", 0.95, "propagating labels")
    warped_labels = None
    report = {**_field_metrics(jac_array, mask), **refine_info}
    if moving_mask is not None:
        report["moving_mask_excluded"] = coverage.excluded_region(moving_mask, mapping, fixed_fg, jac_array)
    if moving_labels is not None:
        warped_labels = sitk.Resample(
            moving_labels,
            fixed,
            mapping,
            sitk.sitkNearestNeighbor,
            0,
            moving_labels.GetPixelID(),
        )
        if fixed_labels is not None:
            report.update(_dice_metrics(warped_labels, fixed_labels, moving_labels))
    stages.end()
    stages.timings["total"] = round(time.perf_counter() - start + sum(prepared.timings.values()), 3)
    if progress is not None:
        progress(1.0, "done")
    return RegistrationResult(
        warped=warped,
        displacement=displacement,
        inverse_displacement=inverse_map,
        jacobian=jacobian,
        folding=folding,
        warped_labels=warped_labels,
        metrics=report,
        timings=stages.timings,
        device=_device_name(torch_device),
        model={"name": loaded.name, "sha256": loaded.sha256, "variant": cfg.variant, "spacing_mm": loaded.spacing_mm},
        alpha=alpha,
        affine=transform,
    )


def work_grid(fixed: sitk.Image, fixed_fg: sitk.Image, network_spacing_mm: float) -> sitk.Image:
    """The LPS-aligned work grid around the fixed foreground, its sizes divisible down to the network's grid,
    placed so that the fixed image is sampled on it, not interpolated (``imaging.on_voxel_centres``)."""
    factor = work_grid_factor(network_spacing_mm)
    reference = imaging.model_reference(
        fixed, network_spacing_mm / factor, multiple=imaging.SIZE_MULTIPLE * factor, mask=fixed_fg
    )
    return imaging.on_voxel_centres(reference, fixed)


def work_grid_factor(network_spacing_mm: float) -> int:
    """How many work-grid voxels one network voxel spans along each axis (1: the network's grid is the work grid)."""
    ratio = network_spacing_mm / WORK_SPACING_MM
    factor = round(ratio)
    return factor if factor > 1 and abs(ratio - factor) < 1e-6 else 1


def _network_velocity(
    loaded: LoadedModel, pair, normalised, reference: sitk.Image, transform, alpha: float, work_grid_passes: int
):
    """The network's velocity for the (moving, fixed) ``pair`` of the work grid, on the work grid's velocity grid.
    A network coarser than the work grid sees the ``normalised`` images resampled onto its own grid instead, from
    the originals, as in training, and ``work_grid_passes`` further passes then run on the work grid's pair (a
    network on the work grid's own spacing makes none: they would repeat its pass on the same grid)."""
    factor = work_grid_factor(loaded.spacing_mm)
    work_pair = pair
    if factor > 1:
        coarse = imaging.coarser_grid(reference, factor)
        device = pair[0].device
        moving_norm, fixed_norm = normalised
        pair = (
            _tensor(imaging.resample(moving_norm, coarse, transform=transform), device),
            _tensor(imaging.resample(fixed_norm, coarse), device),
        )
    velocity = _predict(loaded, *pair, alpha)
    if factor > 1:  # onto the work grid's velocity grid, voxel units rescaled
        velocity = spatial.resize_field(velocity, tuple(n * factor for n in velocity.shape[2:]))
        if work_grid_passes:
            work_pair = tuple(t.to(velocity.device) for t in work_pair)
            velocity = _predict(loaded, *work_pair, alpha, passes=work_grid_passes, start=velocity)
    return velocity


def _tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(image)).to(device)[None, None]


def _predict(
    loaded: LoadedModel,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    alpha: float,
    passes: int = 1,
    start: torch.Tensor | None = None,
):
    """The network's symmetric velocity (``DTN.symmetric_velocity``: ``passes``, from ``start`` if given) on the
    tensors' device; a CUDA out-of-memory falls back to the CPU with a warning."""
    try:
        to_device(loaded.model, moving.device)
        with torch.inference_mode():
            return loaded.model.symmetric_velocity(moving, fixed, alpha, passes=passes, start=start)
    except torch.cuda.OutOfMemoryError:
        import warnings

        warnings.warn("CUDA ran out of memory; running on the CPU instead", RuntimeWarning, stacklevel=3)
        torch.cuda.empty_cache()
        start = None if start is None else start.cpu()
        return _predict(loaded, moving.cpu(), fixed.cpu(), alpha, passes, start)


# The similarity is computed on the mask grown by this much, so that the brain's edge (tissue against background)
# drives the deformation there too: on the mask itself, the edge had no say, and the 2 mm development pairs lost
# 0.02 Dice and folded on 0.02-0.05 % of the brain (docs/benchmarks.md).
MASK_MARGIN_MM = 8.0


def similarity_region(mask: torch.Tensor, reference: sitk.Image) -> torch.Tensor:
    """The fixed mask grown by ``MASK_MARGIN_MM`` (a cube, by max pooling) on the work grid."""
    radius = int(round(MASK_MARGIN_MM / reference.GetSpacing()[0]))
    return F.max_pool3d((mask > 0.5).float(), 2 * radius + 1, stride=1, padding=radius)


def refinement_schedule(preset: str | None, refine: int | None) -> Schedule:
    """The schedule a run uses: ``refine`` steps on the work grid when given (0: the network alone), else the
    preset's (``fast`` by default)."""
    if refine is not None:
        return single_level(int(refine), WORK_SPACING_MM)
    return PRESETS[preset or DEFAULT_PRESET]


def _pyramid(schedule: Schedule, pair, reference: sitk.Image, normalised, transform, device) -> list:
    """The (moving, fixed) tensors of each level: the work grid's, average-pooled copies for coarser levels, and
    the normalised images on finer grids (same extent, stride-pyramid voxel centres): the fixed one resampled, the
    moving one seen through the affine on its own grid."""
    work = reference.GetSpacing()[0]
    levels = []
    for spacing in schedule.spacings:
        ratio = spacing / work
        if ratio >= 1:
            factor = int(round(ratio))
            if abs(ratio - factor) > 1e-6:
                raise ValueError(f"level spacing {spacing} mm is not a multiple of the work grid's {work} mm")
            levels.append(tuple(F.avg_pool3d(t, factor) if factor > 1 else t for t in pair))
        else:
            fine = imaging.finer_grid(reference, int(round(1 / ratio)))
            moving_norm, fixed_norm = normalised
            levels.append(
                (
                    _moving_level(moving_norm, fine, transform, device),
                    _tensor(imaging.resample(fixed_norm, fine), device),
                )
            )
    return levels


def _moving_level(moving: sitk.Image, grid: sitk.Image, transform: sitk.Transform, device):
    """The moving image for a level at about its own resolution: kept on its own grid and sampled through the affine
    and the deformation at once (``spatial.SeenThroughAffine``); measured on the 1 mm pairs: docs/benchmarks.md."""
    if not isinstance(transform, sitk.AffineTransform):  # any other transform: resampled onto the level's grid
        return _tensor(imaging.resample(moving, grid, transform=transform), device)
    index_map = torch.from_numpy(imaging.index_map(grid, moving, transform)).float().to(device)
    shape = tuple(sitk.GetArrayViewFromImage(grid).shape)
    return spatial.SeenThroughAffine(_tensor(moving, device), index_map, shape)


def _finest(reference: sitk.Image, schedule: Schedule) -> sitk.Image:
    """The grid the output field is built on: the work grid, or the finest refinement level's."""
    finest = min(schedule.spacings, default=reference.GetSpacing()[0])
    ratio = reference.GetSpacing()[0] / finest
    return imaging.finer_grid(reference, int(round(ratio))) if ratio > 1 + 1e-6 else reference


def _refine(velocity, levels, masks, alpha, schedule, similarity, integration_steps, stages):
    def on_step(done: int, total: int, loss: float) -> None:
        stages.check_cancel()
        if stages.progress is not None:
            stages.progress(round(0.4 + 0.45 * done / total, 6), f"refining: step {done}/{total}, loss {loss:.4f}")

    with torch.enable_grad():
        return refine_schedule(
            velocity,
            levels,
            schedule,
            alpha=alpha,
            similarity=similarity,
            mask=masks[0],
            integration_steps=integration_steps,
            on_step=on_step,
            moving_mask=masks[1],
        )


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _field_metrics(jac: np.ndarray, mask: sitk.Image | None) -> dict:
    region = None if mask is None else sitk.GetArrayViewFromImage(mask) > 0
    count, percent = metrics.folding(jac, region)
    return {
        "folding_count": count,
        "folding_percent": percent,
        "sd_log_jacobian": metrics.sd_log_jacobian(jac, region),
        "jacobian_min": float(jac.min()),
        "jacobian_max": float(jac.max()),
    }


def _dice_metrics(warped_labels: sitk.Image, fixed_labels: sitk.Image, moving_labels: sitk.Image) -> dict:
    """Dice per label (``metrics.label_dice``: the labels of both maps) and their mean."""
    arrays = (sitk.GetArrayViewFromImage(image) for image in (warped_labels, fixed_labels, moving_labels))
    per_label = metrics.label_dice(*arrays)
    values = [v for v in per_label.values() if not np.isnan(v)]
    return {"dice": {str(k): v for k, v in per_label.items()}, "dice_mean": float(np.mean(values)) if values else None}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


__all__ = ["Cancelled", "RegistrationResult", "register", "resolve_device", "work_grid_factor"]
