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
