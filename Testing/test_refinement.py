import torch
from conftest import image_from_labels, phantom_labels, smooth_displacement

from DTNRegistrationLib import refinement, spatial

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
    before = float(refinement.objective(start, moving, fixed, 0.1, "mse"))
    v = refinement.refine_velocity(start, moving, fixed, 0.1, 30, similarity="mse")
    assert float(refinement.objective(v, moving, fixed, 0.1, "mse")) < 0.7 * before


def test_a_prediction_worse_than_no_deformation_is_not_used_as_the_start():
    moving, fixed = _pair()
    torch.manual_seed(0)
    wild = torch.randn(1, 3, 16, 16, 16) * 3.0  # what an unsuited model might predict
    v, origin = refinement.better_start(wild, moving, fixed, 0.1, similarity="mse")
    assert origin == "identity" and torch.equal(v, torch.zeros_like(wild))
    small = torch.zeros(1, 3, 16, 16, 16)
    assert refinement.better_start(small, moving, fixed, 0.1, similarity="mse")[1] == "network"  # ties keep it


def test_a_folding_prediction_is_not_used_even_when_it_scores_better():
    """Exact shift of the phantom plus strong noise in a corner where both images are empty: the objective
    prefers it (tiny alpha), but the map folds there, so refinement starts from zero."""
    fixed = torch.from_numpy(image_from_labels(phantom_labels(SHAPE)))[None, None]
    shift = torch.zeros(1, 3, 16, 16, 16)
    shift[:, 2] = 1.0  # one voxel of the velocity grid = two image voxels along W
    moving = spatial.warp(
        fixed, spatial.integrate(-shift).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4) * 2
    )
    assert refinement.better_start(shift, moving, fixed, 1e-6, "mse")[1] == "network"
    torch.manual_seed(0)
    ripple = shift.clone()
    ripple[:, :, :5, :5, :5] += torch.randn(1, 3, 5, 5, 5) * 4.0  # a corner where both images are background
    assert refinement.folding_percent(ripple) > refinement.MAX_START_FOLDING_PERCENT
    v, origin = refinement.better_start(ripple, moving, fixed, 1e-6, "mse")
    assert origin == "identity (network field folds)" and not v.any()
