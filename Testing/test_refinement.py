import torch
from conftest import image_from_labels, imports_in_fresh_process, phantom_labels, smooth_displacement

from DTNRegistrationLib.core import losses, refinement, spatial

SHAPE = (32, 32, 32)


def _pair():
    labels = torch.from_numpy(phantom_labels(SHAPE))[None, None]
    true_v = torch.from_numpy(smooth_displacement(SHAPE, 2.0, seed=2))[None]
    moving_labels = spatial.warp(labels, spatial.integrate(true_v), mode="nearest")
    fixed = torch.from_numpy(image_from_labels(labels[0, 0].numpy()))[None, None]
    moving = torch.from_numpy(image_from_labels(moving_labels[0, 0].numpy(), 1))[None, None]
    return moving, fixed


def test_refinement_lowers_the_objective_from_the_given_start():
    moving, fixed = _pair()
    start = torch.zeros(1, 3, 16, 16, 16) + 1e-3
    before = float(losses.registration_objective(start, moving, fixed, alpha=0.1, similarity="mse"))
    v = refinement.refine_velocity(start, moving, fixed, alpha=0.1, steps=30, similarity="mse")
    assert float(losses.registration_objective(v, moving, fixed, alpha=0.1, similarity="mse")) < 0.7 * before


def test_a_prediction_worse_than_no_deformation_is_not_used_as_the_start():
    moving, fixed = _pair()
    torch.manual_seed(0)
    wild = torch.randn(1, 3, 16, 16, 16) * 3.0  # what an unsuited model might predict
    v, origin = refinement.better_start(wild, moving, fixed, alpha=0.1, similarity="mse")
    assert origin == "identity" and torch.equal(v, torch.zeros_like(wild))
    small = torch.zeros(1, 3, 16, 16, 16)
    assert refinement.better_start(small, moving, fixed, alpha=0.1, similarity="mse")[1] == "network"  # ties keep it


def test_a_folding_prediction_is_not_used_even_when_it_scores_better():
    """Exact shift of the phantom plus strong noise in a corner where both images are empty: the objective
    prefers it (tiny alpha), but the map folds there, so refinement starts from zero."""
    fixed = torch.from_numpy(image_from_labels(phantom_labels(SHAPE)))[None, None]
    shift = torch.zeros(1, 3, 16, 16, 16)
    shift[:, 2] = 1.0  # one voxel of the velocity grid = two image voxels along W
    moving = spatial.warp(
        fixed, spatial.integrate(-shift).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4) * 2
    )
    assert refinement.better_start(shift, moving, fixed, alpha=1e-6, similarity="mse")[1] == "network"
    torch.manual_seed(0)
    ripple = shift.clone()
    ripple[:, :, :5, :5, :5] += torch.randn(1, 3, 5, 5, 5) * 4.0  # a corner where both images are background
    assert refinement.folding_percent(ripple) > refinement.MAX_START_FOLDING_PERCENT
    v, origin = refinement.better_start(ripple, moving, fixed, alpha=1e-6, similarity="mse")
    assert origin == "identity (network field folds)" and not v.any()


def _level_pair(moving, fixed, factor):
    pool = torch.nn.functional.avg_pool3d
    return (pool(moving, factor), pool(fixed, factor)) if factor > 1 else (moving, fixed)


def test_each_level_of_a_schedule_lowers_the_fine_objective_and_the_field_keeps_the_finest_grid():
    """A known smooth deformation: a coarse level alone helps, and a fine level after it helps more."""
    moving, fixed = _pair()
    start = torch.zeros(1, 3, 16, 16, 16)
    coarse = refinement.RefineLevel(4.0, 20, 3, 0.2, 2)
    fine = refinement.RefineLevel(2.0, 10, 5, 0.1, 2)
    pyramid = [_level_pair(moving, fixed, 2), _level_pair(moving, fixed, 1)]
    v_coarse, _ = refinement.refine_schedule(start, pyramid[:1], refinement.Schedule((coarse,)), alpha=0.1)
    v_both, taken = refinement.refine_schedule(start, pyramid, refinement.Schedule((coarse, fine)), alpha=0.1)
    assert taken == [20, 10]
    assert v_coarse.shape == v_both.shape == start.shape  # the running field keeps the finest velocity grid

    def score(v):
        return float(losses.registration_objective(v, moving, fixed, alpha=0.1, similarity="ncc", window=5))

    assert score(v_both) < score(v_coarse) < score(start)


def test_a_level_stops_early_once_the_objective_stalls_and_progress_counts_every_scheduled_step():
    moving, fixed = _pair()
    calls = []
    schedule = refinement.Schedule((refinement.RefineLevel(2.0, 200, 5, 0.1, 2),), tolerance=0.05, patience=3)
    _, taken = refinement.refine_schedule(
        torch.zeros(1, 3, 16, 16, 16), [(moving, fixed)], schedule, alpha=0.1, on_step=lambda *a: calls.append(a)
    )
    assert 3 < taken[0] < 200 and len(calls) == taken[0]
    assert all(total == 200 for _, total, _ in calls)


def test_presets_go_from_coarse_to_fine():
    for name, schedule in refinement.PRESETS.items():
        assert schedule.spacings == sorted(schedule.spacings, reverse=True), name
        assert all(level.window % 2 == 1 and level.steps > 0 for level in schedule.levels), name
    assert min(refinement.PRESETS["accurate"].spacings) < min(refinement.PRESETS["fast"].spacings)


def test_the_refinement_steps_are_torchs_adam_without_importing_its_compiler():
    """Same trajectory as torch.optim.Adam; the import of torch._dynamo (about 1 s of start-up) is avoided."""
    torch.manual_seed(0)
    target = torch.randn(1, 3, 4, 5, 6)
    ours, reference = (torch.zeros_like(target, requires_grad=True) for _ in range(2))
    steppers = {id(ours): refinement.AdamStepper(ours, 0.1), id(reference): torch.optim.Adam([reference], lr=0.1)}
    for _ in range(15):
        for tensor in (ours, reference):
            tensor.grad = None
            ((tensor - target) ** 3).abs().sum().backward()
            steppers[id(tensor)].step()
    assert torch.allclose(ours, reference, atol=1e-7) and not torch.equal(ours, torch.zeros_like(ours))

    script = (
        "import torch\n"
        "from DTNRegistrationLib.core import refinement\n"
        "m = torch.rand(1, 1, 16, 16, 16); f = torch.rand(1, 1, 16, 16, 16)\n"
        "refinement.refine_velocity(torch.zeros(1, 3, 8, 8, 8), m, f, alpha=0.1, steps=2, similarity='mse')\n"
    )
    assert not imports_in_fresh_process(script, "torch._dynamo")
