"""The registration pipeline: recovery of a known deformation, exact outputs, geometry invariance, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import (
    image_from_labels,
    imports_in_fresh_process,
    known_deformation_labels,
    phantom_labels,
    register_pair,
    tiny_config,
    zero_velocity_model,
)

from DTNRegistrationLib.core import imaging, models, registration, spatial
from DTNRegistrationLib.core.network import build_model
from DTNRegistrationLib.errors import InputError

SHAPE = (40, 48, 44)  # array order (z, y, x), 2 mm voxels


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return zero_velocity_model(tmp_path_factory.mktemp("model"), similarity="mse")


def _image(array, spacing=(2.0, 2.0, 2.0), origin=(-40.0, -50.0, -30.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.fixture(scope="module")
def known_pair():
    """Fixed phantom and the moving one made from it by a known smooth diffeomorphism."""
    fixed_labels, moving_labels = known_deformation_labels(SHAPE)
    return {
        "fixed": _image(image_from_labels(fixed_labels, 0)),
        "moving": _image(image_from_labels(moving_labels, 1)),
        "fixed_labels": _image(fixed_labels.astype(np.int32)),
        "moving_labels": _image(moving_labels.astype(np.int32)),
    }


@pytest.fixture(scope="module")
def refined(known_pair, tiny_model):
    return register_pair(
        known_pair,
        tiny_model,
        refine=40,
        refine_similarity="mse",  # the phantom's intensities match: the cleanest check of the maps
        alpha=0.1,
        inverse=True,
    )


def _dice_before(pair) -> float:
    from DTNRegistrationLib.core import metrics

    return metrics.mean_dice(
        sitk.GetArrayFromImage(pair["moving_labels"]), sitk.GetArrayFromImage(pair["fixed_labels"])
    )


def test_known_deformation_is_recovered(known_pair, refined):
    before = _dice_before(known_pair)
    assert refined.metrics["dice_mean"] > before + 0.08, (before, refined.metrics["dice_mean"])
    assert refined.metrics["folding_percent"] < 0.05
    assert set(refined.timings) >= {"affine", "preprocess", "network", "refine", "outputs", "total"}


def test_displacement_alone_reproduces_the_warped_image_and_labels(known_pair, refined):
    transform = sitk.DisplacementFieldTransform(sitk.Image(refined.displacement))
    again = sitk.Resample(known_pair["moving"], known_pair["fixed"], transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(refined.warped))
    labels = sitk.Resample(known_pair["moving_labels"], known_pair["fixed"], transform, sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(refined.warped_labels))
    assert refined.displacement.GetPixelID() == sitk.sitkVectorFloat64
    assert np.abs(sitk.GetArrayFromImage(refined.displacement)).max() > 1.0  # a real deformation, in mm


def test_inverse_composes_with_forward_to_near_identity(known_pair, refined):
    """Bound: |inverse(forward(p)) - p| is < 0.1 mm at the median, < 0.5 mm (a quarter voxel) at 95 % of interior
    voxels and under one voxel (2 mm) everywhere; exp(-v) is the exact inverse up to discretisation."""
    forward = sitk.DisplacementFieldTransform(sitk.Image(refined.displacement))
    backward = sitk.DisplacementFieldTransform(sitk.Image(refined.inverse_displacement))
    fixed = known_pair["fixed"]
    errors = []
    for index in np.ndindex(*[n - 8 for n in fixed.GetSize()]):
        if sum(index) % 7:
            continue  # a sparse sample of the interior keeps the test quick
        p = fixed.TransformIndexToPhysicalPoint([int(i) + 4 for i in index])
        errors.append(np.linalg.norm(np.subtract(backward.TransformPoint(forward.TransformPoint(p)), p)))
    errors = np.array(errors)
    assert np.median(errors) < 0.1 and np.percentile(errors, 95) < 0.5 and errors.max() < 2.0


def test_jacobian_and_folding_agree(refined):
    jac = sitk.GetArrayFromImage(refined.jacobian)
    fold = sitk.GetArrayFromImage(refined.folding)
    np.testing.assert_array_equal(fold == 1, jac <= 0)
    assert refined.metrics["folding_count"] == int((jac <= 0).sum())


def _half_mask() -> np.ndarray:
    """A fixed mask over the first half of the x axis."""
    half = np.zeros(SHAPE, np.uint8)
    half[:, :, : SHAPE[2] // 2] = 1
    return half


def test_a_folded_map_is_reported_voxel_for_voxel_and_inside_the_mask(known_pair, tiny_model, rough_network_field):
    """A rough velocity (the network's safeguard bypassed, no refinement) folds the map: the folding image marks
    exactly the voxels where det J <= 0, and the report's folding and SDlogJ cover the fixed mask only."""
    half = _half_mask()
    mask = _image(half)
    result = registration.register(
        known_pair["moving"], known_pair["fixed"], model=tiny_model, refine=0, affine=False, mask=mask
    )
    jac = sitk.GetArrayFromImage(result.jacobian)
    fold = sitk.GetArrayFromImage(result.folding)
    assert (jac <= 0).sum() > 100  # the field really folds
    np.testing.assert_array_equal(fold == 1, jac <= 0)
    inside = half == 1
    assert result.metrics["folding_count"] == int((jac[inside] <= 0).sum()) < int((jac <= 0).sum())
    assert result.metrics["folding_percent"] == pytest.approx(100 * (jac[inside] <= 0).mean())
    expected_sd = np.log(np.clip(jac[inside].astype(np.float64), 1e-9, 1e9)).std()
    assert result.metrics["sd_log_jacobian"] == pytest.approx(expected_sd, rel=1e-9)


def test_the_fixed_mask_confines_the_similarity(known_pair, tiny_model):
    """With a mask over one half of the fixed image, what the fixed image holds far outside it (16 mm past the
    edge, beyond the similarity's margin) does not change the map inside the mask at all; without the mask it
    does. (Refinement's Adam steps amplify any leak: even a changed intensity scaling would show.)"""
    half = _half_mask()
    far = (slice(None), slice(None), slice(SHAPE[2] // 2 + 8, None))
    array = sitk.GetArrayFromImage(known_pair["fixed"])
    region = array[far]  # its tissue replaced by bright noise; the background level (intensity scaling) is kept
    tissue = region > 0.25 * array.max()
    region[tissue] = np.random.default_rng(0).uniform(0.5, 1.0, int(tissue.sum())) * array.max()
    array[far] = region
    corrupted = _image(array.astype(np.float32))
    options = dict(model=tiny_model, refine=10, refine_similarity="mse", alpha=0.1, affine=False, inverse=False)

    def change_inside(mask):
        fields = [
            sitk.GetArrayFromImage(
                registration.register(known_pair["moving"], fixed, mask=mask, **options).displacement
            )
            for fixed in (known_pair["fixed"], corrupted)
        ]
        return float(np.abs(fields[0] - fields[1])[half == 1].max())

    assert change_inside(None) > 0.1  # the corruption matters when the whole image is matched
    assert change_inside(_image(half)) < 1e-3  # 0 in every run so far; a bound, not equality, against round-off


def test_same_physical_result_in_any_orientation(known_pair, tiny_model):
    """The pair re-stored as RAS / LIA / PSR (flipped, permuted axes) registers to the same physical map.

    Bound: the displacement agrees to 0.25 mm (an eighth of a voxel) and the warped image to 0.1 (of 0.8) at
    every voxel, to 1e-2 mm and 1e-3 on average: float round-off in the resampled copies that the foreground
    masks are computed on can move a mask edge by one voxel, and nothing else differs.
    """
    results = {}
    for code in ("LPS", "RAS", "LIA", "PSR"):
        moving = sitk.DICOMOrient(known_pair["moving"], code)
        fixed = sitk.DICOMOrient(known_pair["fixed"], code)
        results[code] = registration.register(
            moving, fixed, model=tiny_model, refine=3, refine_similarity="mse", alpha=0.05, affine=False
        )
    reference = known_pair["fixed"]
    base = sitk.GetArrayFromImage(results["LPS"].warped)
    base_field = sitk.GetArrayFromImage(results["LPS"].displacement)
    assert np.abs(base_field).max() > 0.1  # the refinement moved something
    for code in ("RAS", "LIA", "PSR"):
        warped = sitk.GetArrayFromImage(imaging.resample(results[code].warped, reference, "nearest"))
        assert np.abs(warped - base).max() < 0.1 and np.abs(warped - base).mean() < 1e-3, code
        field = sitk.Resample(results[code].displacement, reference, sitk.Transform(), sitk.sitkNearestNeighbor)
        difference = np.abs(sitk.GetArrayFromImage(field) - base_field)
        assert difference.max() < 0.25 and difference.mean() < 1e-2, code


def test_anisotropic_oblique_moving_image_is_handled(known_pair, tiny_model):
    """A moving image on a rotated 1.5 x 2 x 3 mm grid still lands on the fixed image (affine on)."""
    rotation = sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.15)
    reference = sitk.Image([60, 50, 30], sitk.sitkFloat32)
    reference.SetSpacing((1.5, 2.0, 3.0))
    reference.SetDirection(rotation.GetMatrix())
    centre = np.array(
        known_pair["fixed"].TransformContinuousIndexToPhysicalPoint([s / 2 for s in known_pair["fixed"].GetSize()])
    )
    extent = np.array(rotation.GetMatrix()).reshape(3, 3) @ (np.array([60 * 1.5, 50 * 2.0, 30 * 3.0]) / 2)
    reference.SetOrigin(tuple(centre - extent))
    moving = sitk.Resample(known_pair["fixed"], reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    result = registration.register(moving, known_pair["fixed"], model=tiny_model, refine=0)
    fixed = sitk.GetArrayFromImage(known_pair["fixed"])
    warped = sitk.GetArrayFromImage(result.warped)
    inside = fixed > 0.2
    assert np.corrcoef(fixed[inside], warped[inside])[0, 1] > 0.9


def test_progress_and_cancel(known_pair, tiny_model):
    seen = []
    registration.register(
        known_pair["moving"], known_pair["fixed"], model=tiny_model, affine=False, progress=lambda f, m: seen.append(f)
    )
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(registration.Cancelled):
        registration.register(known_pair["moving"], known_pair["fixed"], model=tiny_model, cancel=lambda: len(seen) > 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: {**p, "moving": sitk.Image([8, 8, 8], sitk.sitkFloat32)}, "moving image: is constant"),
        (lambda p: {**p, "fixed": _with_nan(p["fixed"])}, r"fixed image: contains NaN or Inf voxels \(1 of \d+;"),
        (lambda p: {**p, "fixed": sitk.Image([30, 30], sitk.sitkFloat32) + 1}, "fixed image: a 2-D image"),
        (lambda p: {**p, "moving_labels": sitk.Cast(p["moving_labels"], sitk.sitkFloat32) * 0.5}, "not an integer"),
        (lambda p: {**p, "moving_labels": _image(np.zeros((8, 8, 8), np.int32))}, "does not match its image"),
    ],
)
def test_bad_inputs_are_named(known_pair, tiny_model, change, message):
    pair = change(dict(known_pair))
    with pytest.raises(InputError, match=message):
        registration.register(pair["moving"], pair["fixed"], moving_labels=pair["moving_labels"], model=tiny_model)


def test_cuda_asked_for_but_absent(known_pair, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    with pytest.raises(InputError, match="no CUDA GPU"):
        registration.register(known_pair["moving"], known_pair["fixed"], model=tiny_model, device="cuda")


def _with_nan(image: sitk.Image) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    array[3, 3, 3] = np.nan
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def test_bad_options_are_refused_before_any_work(known_pair, tiny_model):
    calls = []
    for options, message in (
        ({"refine_similarity": "cc"}, "unknown refinement similarity 'cc'"),
        ({"refine": -1}, "refine steps must be >= 0"),
        ({"alpha": 0.0}, "alpha must be a positive number"),
    ):
        with pytest.raises(InputError, match=message):
            registration.register(
                known_pair["moving"],
                known_pair["fixed"],
                model=tiny_model,
                progress=lambda f, m: calls.append(m),
                **options,
            )
    assert "affine initialisation" not in calls


def test_the_work_grid_samples_a_2mm_fixed_image_on_its_voxels():
    """The pipeline's grid for a 2 mm fixed image (a 4 mm network: a 2 mm work grid) copies the image's voxels: no
    half-voxel blur of the fixed image before the similarity sees it (docs/benchmarks.md)."""
    rng = np.random.default_rng(3)
    fixed = _image(rng.integers(0, 100, SHAPE).astype(np.float32), origin=(-40.3, -50.0, -29.1))
    head = np.zeros(SHAPE, np.uint8)
    head[4:35, 4:35, 4:35] = 1  # odd extents: a grid centred on it falls half-way between the voxels
    fixed_fg = sitk.GetImageFromArray(head)
    fixed_fg.CopyInformation(fixed)
    centred = imaging.model_reference(fixed, 2.0, multiple=32, mask=fixed_fg)
    index = np.array(fixed.TransformPhysicalPointToContinuousIndex(centred.GetOrigin()))
    assert np.abs(index - np.round(index)).max() > 0.4
    grid = registration.work_grid(fixed, fixed_fg, network_spacing_mm=4.0)
    assert grid.GetSpacing() == (2.0, 2.0, 2.0)
    assert all(n % 32 == 0 for n in grid.GetSize())  # divisible down to the network's grid
    index = np.array(fixed.TransformPhysicalPointToContinuousIndex(grid.GetOrigin()))
    np.testing.assert_allclose(index, np.round(index), atol=1e-6)


def test_a_level_finer_than_the_work_grid_samples_the_moving_image_once_through_affine_and_deformation():
    """accurate's 1 mm level on a 1 mm pair whose affine is half a voxel off and whose deformation undoes it: the
    warped moving image is the image itself, sampled on its own voxels. Resampled through the affine first and
    warped again (two linear interpolations, the former pipeline), it loses a third of its contrast."""
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(rng.normal(size=(64, 64, 64)).astype(np.float32))
    image = sitk.SmoothingRecursiveGaussian(noise, 1.0)
    image.SetOrigin((-31.5, -31.5, -31.5))
    reference = registration.work_grid(image, sitk.Cast(image > -100, sitk.sitkUInt8), network_spacing_mm=4.0)
    half_voxel = sitk.AffineTransform(3)
    half_voxel.SetTranslation((0.5, 0.5, 0.5))
    cpu = torch.device("cpu")
    work_pair = (registration._tensor(imaging.resample(image, reference), cpu),) * 2
    schedule = registration.PRESETS["accurate"]
    assert schedule.spacings[-1] == 1.0
    moving, fixed = registration._pyramid(schedule, work_pair, reference, (image, image), half_voxel, cpu)[-1]
    undo = torch.full((1, 3, *fixed.shape[2:]), -0.5)
    inside = (0, 0) + (slice(28, 68),) * 3  # well inside the image on the 96^3 1 mm grid
    once = spatial.warp(moving, undo)
    np.testing.assert_allclose(once[inside].numpy(), fixed[inside].numpy(), atol=1e-4)
    twice = spatial.warp(moving.on_grid(), undo)
    assert float(twice[inside].std() / fixed[inside].std()) < 0.75


def test_coarser_grid_covers_the_same_extent():
    fine = sitk.Image([8, 6, 4], sitk.sitkFloat32)
    fine.SetSpacing((1.0, 2.0, 0.5))
    fine.SetOrigin((3.0, -2.0, 7.0))
    fine.SetDirection(sitk.VersorTransform((0.3, 0.2, 0.9), 0.7).GetMatrix())
    coarse = imaging.coarser_grid(fine, 2)
    assert coarse.GetSize() == (4, 3, 2)
    fine_centres = [
        [
            fine.TransformIndexToPhysicalPoint((2 * i + a, 2 * j + b, 2 * k + c))
            for a in (0, 1)
            for b in (0, 1)
            for c in (0, 1)
        ]
        for i, j, k in [(0, 0, 0), (3, 2, 1)]
    ]
    for (i, j, k), block in zip([(0, 0, 0), (3, 2, 1)], fine_centres):
        np.testing.assert_allclose(coarse.TransformIndexToPhysicalPoint((i, j, k)), np.mean(block, axis=0), atol=1e-9)
    with pytest.raises(ValueError, match="not divisible"):
        imaging.coarser_grid(fine, 3)


def test_a_coarser_network_runs_on_its_own_grid_and_its_field_keeps_its_size_in_mm(tmp_path):
    """A 4 mm model predicting a constant velocity of half a voxel of its velocity grid (8 mm) along x moves every
    point by 4 mm; the result still comes on the 2 mm work grid, and a shifted copy of the image is matched.

    Every point of the image: beyond the model grid the field continues with its border values, so the map
    neither jumps back to the affine alone there (which folded real results) nor bends (Jacobian 1)."""
    assert registration.work_grid_factor(4.0) == 2 and registration.work_grid_factor(2.0) == 1
    assert registration.work_grid_factor(3.0) == 1  # not a whole multiple of the work spacing: used as it is
    model = build_model(tiny_config())
    with torch.no_grad():
        model.velocity_head.weight.zero_()
        model.velocity_head.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))  # channel 2 = array axis W = x
    path = tmp_path / "coarse.safetensors"
    models.save_weights(model, path, {"spacing_mm": 4.0})
    # a wide empty border (60 mm) puts the image's edges well beyond the model grid (head + 8 mm margin)
    fixed_array = np.pad(image_from_labels(phantom_labels(SHAPE), 0), 30)
    fixed = _image(fixed_array)
    moving = _image(fixed_array, origin=(-36.0, -50.0, -30.0))  # the same anatomy 4 mm further along x
    loaded = models.load_weights(path)

    # a constant velocity is its own swap, so the symmetric inference would cancel it: one direction, and the
    # further passes on the work grid (which continue from ``start``) add nothing
    def one_direction(moving, fixed, alpha, passes, start):
        return loaded.model(moving, fixed, alpha) if start is None else start

    loaded.model.symmetric_velocity = one_direction
    result = registration.register(moving, fixed, model=loaded, refine=0, affine=False, device="cpu")
    assert result.metrics["start"] == "network"
    assert result.displacement.GetSize() == fixed.GetSize()
    # everywhere, also beyond the model grid (the field continues with its border values; no band, no fold)
    field = sitk.GetArrayFromImage(result.displacement).reshape(-1, 3)
    np.testing.assert_allclose(field, np.tile([4.0, 0.0, 0.0], (len(field), 1)), atol=0.05)
    inverse = sitk.GetArrayFromImage(result.inverse_displacement).reshape(-1, 3)
    np.testing.assert_allclose(inverse, np.tile([-4.0, 0.0, 0.0], (len(inverse), 1)), atol=0.05)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.jacobian), 1.0, atol=1e-3)
    assert result.metrics["folding_count"] == 0


@pytest.fixture(scope="module")
def known_pair_1mm(known_pair):
    """The known pair on a 1 mm grid (so that the accurate preset keeps its 1 mm level)."""

    def finer(image, interpolator):
        grid = sitk.Image([2 * n for n in image.GetSize()], image.GetPixelID())
        grid.SetSpacing([s / 2 for s in image.GetSpacing()])
        grid.SetOrigin([o - s / 4 for o, s in zip(image.GetOrigin(), image.GetSpacing())])
        return sitk.Resample(image, grid, sitk.Transform(), interpolator)

    return {
        name: finer(image, sitk.sitkNearestNeighbor if "labels" in name else sitk.sitkLinear)
        for name, image in known_pair.items()
    }


@pytest.fixture(scope="module")
def by_schedule(known_pair_1mm, tiny_model):
    """The known deformation (1 mm) registered with each preset and with the former default (25 steps at 2 mm)."""
    runs = {"before": {"refine": 25}, "fast": {"preset": "fast"}, "accurate": {"preset": "accurate"}}
    return {name: register_pair(known_pair_1mm, tiny_model, **options) for name, options in runs.items()}


def test_both_presets_recover_a_known_deformation_at_least_as_well_as_the_former_default(known_pair_1mm, by_schedule):
    before = _dice_before(known_pair_1mm)
    dice = {name: result.metrics["dice_mean"] for name, result in by_schedule.items()}
    assert dice["before"] > before + 0.05, dice
    assert dice["fast"] >= dice["before"] and dice["accurate"] >= dice["before"], dice
    for result in by_schedule.values():
        assert result.metrics["folding_percent"] <= 0.01 and result.inverse_displacement is None


def test_the_accurate_preset_builds_its_field_on_its_finest_level(known_pair_1mm, by_schedule):
    """The 1 mm level's correction reaches the output: the displacement still reproduces the warped image."""
    accurate = by_schedule["accurate"]
    assert accurate.metrics["refine_levels_mm"] == [4.0, 2.0, 1.0] and accurate.metrics["preset"] == "accurate"
    transform = sitk.DisplacementFieldTransform(sitk.Image(accurate.displacement))
    pair = known_pair_1mm
    again = sitk.Resample(pair["moving"], pair["fixed"], transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(accurate.warped))


def test_levels_finer_than_the_fixed_image_are_left_out():
    from DTNRegistrationLib.core import refinement

    accurate = refinement.PRESETS["accurate"]
    assert accurate.for_image_spacing(1.0).spacings == [4.0, 2.0, 1.0]
    assert accurate.for_image_spacing(2.0).spacings == [4.0, 2.0]
    assert accurate.for_image_spacing(0.5).spacings == [4.0, 2.0, 1.0]
    assert accurate.for_image_spacing(8.0).spacings == [4.0]  # coarser than every level: the coarsest stays


def test_a_schedules_smoothness_weights_the_refinement_objective(known_pair, tiny_model, monkeypatch):
    """The preset's smoothness multiplies alpha in the NCC refinement (reported as refine_alpha): a smoother
    schedule gives a more regular map (lower SDlogJ), from the same start, on the same pair."""
    from DTNRegistrationLib.core import refinement

    results = {}
    for smoothness in (1.0, 10.0):
        schedule = dataclasses.replace(refinement.PRESETS["fast"], smoothness=smoothness)
        monkeypatch.setitem(refinement.PRESETS, "fast", schedule)
        results[smoothness] = register_pair(known_pair, tiny_model, preset="fast", alpha=0.1, refine_similarity="ncc")
    rough, smooth = results[1.0].metrics, results[10.0].metrics
    assert rough["refine_alpha"] == pytest.approx(0.1) and smooth["refine_alpha"] == pytest.approx(1.0)
    assert smooth["sd_log_jacobian"] < 0.8 * rough["sd_log_jacobian"], (smooth, rough)
    assert refinement.PRESETS["fast"].for_image_spacing(8.0).smoothness == 10.0  # kept when levels are dropped
    assert refinement.PRESETS["fast"].refinement_alpha(0.1, "ngf") == 0.1  # NGF and MIND keep their tuned alpha


def test_a_fixed_mask_is_grown_so_that_the_brain_edge_counts():
    mask = torch.zeros(1, 1, 20, 20, 20)
    mask[..., 8:12, 8:12, 8:12] = 1
    reference = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    reference.SetSpacing([2.0] * 3)
    grown = registration.similarity_region(mask, reference)
    radius = round(registration.MASK_MARGIN_MM / 2.0)
    assert grown[0, 0, 8 - radius, 10, 10] == 1 and grown[0, 0, 8 - radius - 1, 10, 10] == 0


def test_a_prepared_alignment_is_used_as_given_and_its_steps_are_timed(known_pair, tiny_model):
    """`register(prepared=align(...))`, as the command line calls it: the affine comes from the alignment (here one
    shifted by 3 mm on purpose) and is not searched again; the alignment's steps count in the timings."""
    from DTNRegistrationLib.core import alignment

    prepared = alignment.align(known_pair["moving"], known_pair["fixed"], affine=False)
    shifted = sitk.AffineTransform(3)
    shifted.SetTranslation((3.0, 0.0, 0.0))
    prepared = dataclasses.replace(prepared, transform=shifted)
    result = registration.register(
        known_pair["moving"], known_pair["fixed"], model=tiny_model, refine=0, inverse=False, prepared=prepared
    )
    assert result.affine.GetTranslation() == (3.0, 0.0, 0.0)
    # the map is the shift alone (a zero-velocity model, no refinement): 3 mm along x everywhere
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(result.displacement)[..., 0], 3.0, atol=1e-6)
    assert {"validate", "affine", "network"} <= set(result.timings)
    assert result.timings["total"] >= result.timings["affine"] + result.timings["network"]


def test_reading_and_aligning_import_no_torch():
    """The command line aligns while torch loads in a thread: its parser (all subcommands, train and evaluate
    included), the alignment and the output modules must not need it; the similarity names match the losses."""
    script = (
        "import SimpleITK as sitk\n"
        "from DTNRegistrationLib.cli import arguments, commands\n"
        "arguments.build_parser().parse_args(['register', '--moving', 'm', '--fixed', 'f', '--output-dir', 'o'])\n"
        "from DTNRegistrationLib.core import alignment, outputs\n"
        "image = sitk.GaussianSource(sitk.sitkFloat32, [32] * 3, [5.0] * 3, [16.0] * 3, 100.0)\n"
        "image.SetSpacing([2.0] * 3)\n"
        "alignment.align(image, image)\n"
    )
    assert not imports_in_fresh_process(script, "torch")
    from DTNRegistrationLib.core import losses
    from DTNRegistrationLib.options import SIMILARITY_TERMS

    assert set(losses.SIMILARITIES) == set(SIMILARITY_TERMS)
