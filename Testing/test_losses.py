import pytest
import torch
import torch.nn.functional as F

from DTNRegistrationLib.core import losses, spatial


def test_l1_and_mse_by_hand_and_with_a_mask():
    a, b = torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)
    b[0, 0, 0, 0, 0] = 2.0
    assert float(losses.l1(a, b)) == pytest.approx(2.0 / 8)
    assert float(losses.mse(a, b)) == pytest.approx(4.0 / 8)
    mask = torch.zeros_like(a)
    mask[0, 0, 1] = 1
    assert float(losses.l1(a, b, mask)) == 0.0
    # a mask that holds every difference leaves the value, and so its balance with the smoothness term, unchanged
    mask[0, 0, 0, 0, 0] = 1
    assert float(losses.l1(a, b, mask)) == pytest.approx(float(losses.l1(a, b)))


def test_local_ncc_is_zero_for_identical_and_invariant_to_linear_intensity_change():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16)
    assert float(losses.local_ncc(x, x)) < 1e-2
    assert float(losses.local_ncc(3 * x + 5, x)) < 1e-2
    assert float(losses.local_ncc(torch.rand(1, 1, 16, 16, 16), x)) > 0.8


def test_local_ncc_box_filter_equals_a_dense_convolution():
    torch.manual_seed(1)
    x = torch.rand(2, 1, 12, 13, 14)
    dense = F.conv3d(x, torch.ones(1, 1, 5, 5, 5) / 125)  # valid windows only
    assert torch.allclose(losses._box_mean(x, 5)[..., 2:-2, 2:-2, 2:-2], dense, atol=1e-6)
    # at a corner the window is truncated: the mean of the 3x3x3 voxels that exist
    assert torch.allclose(losses._box_mean(x, 5)[..., 0, 0, 0], x[..., :3, :3, :3].mean((-3, -2, -1)), atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        losses.local_ncc(x, x, window=4)


@pytest.mark.parametrize("shape, window", [((1, 3, 9, 10, 11), 5), ((2, 1, 12, 11, 10), 9), ((1, 2, 3, 4, 5), 3)])
def test_box_mean_equals_truncated_average_pooling_values_and_gradients(shape, window):
    """The shifted-slice box filter against three 1-D average poolings that leave the padding out of the count."""
    torch.manual_seed(2)
    x = torch.rand(shape, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    p = window // 2
    pooled = y
    for kernel, pad in (((window, 1, 1), (p, 0, 0)), ((1, window, 1), (0, p, 0)), ((1, 1, window), (0, 0, p))):
        pooled = F.avg_pool3d(pooled, kernel, stride=1, padding=pad, count_include_pad=False)
    ours = losses._box_mean(x, window)
    assert torch.allclose(ours, pooled, atol=1e-6)
    weights = torch.rand(shape)
    (ours * weights).sum().backward()
    (pooled * weights).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-5)


def test_gradient_smoothness_of_a_linear_field():
    ramp = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 3, 10, 10, 10) * 0.5
    # only the derivative along axis 0 is non-zero: 0.5^2, averaged over the 3 axes
    assert float(losses.gradient_smoothness(ramp)) == pytest.approx(0.25 / 3)
    assert float(losses.gradient_smoothness(torch.ones(1, 3, 5, 5, 5))) == 0.0


def test_dice_loss():
    onehot = F.one_hot(torch.randint(0, 3, (1, 8, 8, 8)), 3).permute(0, 4, 1, 2, 3).float()
    assert float(losses.dice_loss(onehot, onehot)) == pytest.approx(0.0, abs=1e-6)
    swapped = onehot[:, [0, 2, 1]]
    assert float(losses.dice_loss(swapped, onehot)) > 0.9


def test_unknown_similarity_is_named():
    with pytest.raises(ValueError, match="unknown similarity 'cc'"):
        losses.similarity("cc")


def test_the_folding_penalty_is_zero_without_folding_and_its_gradient_unfolds():
    smooth = torch.zeros(1, 3, 8, 8, 8)
    smooth[:, 0] = torch.linspace(-0.5, 0.5, 8).view(8, 1, 1)  # a gentle stretch: det J > 1 everywhere
    assert float(losses.folding_penalty(smooth)) == 0.0

    folded = torch.zeros(1, 3, 8, 8, 8)
    folded[:, 0, 4:] = -1.5  # voxels 4.. jump back past voxel 3: det J = 1 - 1.5 < 0 across that face
    penalty = losses.folding_penalty(folded)
    assert float(penalty) > 0.0
    # the faces that fold: one slab of 7 x 7 cells of the 7^3 cells, each at threshold - det J = 0.1 + 0.5
    assert float(penalty) == pytest.approx((losses.FOLDING_THRESHOLD + 0.5) * 49 / 7**3)
    u = folded.clone().requires_grad_(True)
    losses.folding_penalty(u).backward()
    assert float(losses.folding_penalty(u.detach() - 0.5 * u.grad * 7**3)) < float(penalty)


def test_the_objective_adds_the_weighted_folding_penalty_of_exp_v():
    torch.manual_seed(0)
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    v = torch.randn(1, 3, 8, 8, 8) * 2.0  # rough enough for exp(v) to fold
    plain = losses.registration_objective(v, moving, fixed, alpha=0.1, similarity="mse")
    weighted = losses.registration_objective(v, moving, fixed, alpha=0.1, similarity="mse", folding_weight=10.0)
    penalty = losses.folding_penalty(spatial.integrate(v))
    assert float(penalty) > 0
    assert float(weighted) == pytest.approx(float(plain) + 10.0 * float(penalty), rel=1e-5)
