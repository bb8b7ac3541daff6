import numpy as np
import pytest

from DTNRegistrationLib.core import metrics


def test_dice_by_hand():
    a = np.zeros((4, 4, 4), int)
    b = np.zeros((4, 4, 4), int)
    a[0, 0, :4] = 1  # 4 voxels
    b[0, 0, 2:4] = 1  # 2 voxels, 2 shared -> 2*2/6
    a[3, 3, 3] = 2
    scores = metrics.dice(a, b)
    assert scores[1] == pytest.approx(4 / 6)
    assert scores[2] == 0.0
    assert np.isnan(metrics.dice(a, b, labels=[7])[7])
    assert metrics.mean_dice(a, b) == pytest.approx((4 / 6 + 0) / 2)


def test_dice_by_histogram_equals_dice_label_by_label():
    """Integer maps take the histogram path; the same maps as floats take the per-label one: equal scores."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 45, (20, 21, 22)).astype(np.uint16)
    b = a.copy()
    b[rng.random(a.shape) < 0.4] = 7
    a[a == 30] = 0  # a label only b has
    fast, slow = metrics.dice(a, b), metrics.dice(a.astype(np.float32), b.astype(np.float32))
    assert fast == slow and 0 not in fast and fast[30] == 0.0 and 0.0 < fast[7] < 0.5
    assert metrics.label_dice(a, b, b) == metrics.label_dice(a.astype(float), b.astype(float), b.astype(float))
    assert metrics.dice(a, b, labels=[3, 1000])[3] == slow[3] and np.isnan(metrics.dice(a, b, labels=[1000])[1000])
    signed = a.astype(np.int16) - 1  # negative labels: the per-label path
    assert metrics.dice(signed, signed)[-1] == 1.0


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.3])
def test_jacobian_of_uniform_scaling(scale):
    shape = (6, 7, 8)
    spacing = (1.0, 2.0, 0.5)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    u = (scale - 1.0) * grid  # x -> scale * x, in mm
    np.testing.assert_allclose(metrics.jacobian_determinant(u, spacing), scale**3, rtol=1e-10)


def test_known_folding_field_gives_known_count():
    """u_0 = -2 x_0 for x_0 <= 10, constant beyond: det = -1 on slabs 0..9, 0 at the kink (slab 10), 1 after."""
    shape = (20, 5, 6)
    x0 = np.arange(shape[0], dtype=float)
    profile = np.where(x0 <= 10, -2 * x0, -20.0)
    u = np.zeros((3,) + shape)
    u[0] = profile[:, None, None]
    jac = metrics.jacobian_determinant(u)
    count, percent = metrics.folding(jac)
    assert count == 11 * 5 * 6
    assert percent == pytest.approx(100 * 11 / 20)
    inside = np.zeros(shape, bool)
    inside[:5] = True
    assert metrics.folding(jac, inside) == (5 * 5 * 6, 100.0)


def test_physical_jacobian_on_oblique_flipped_grid():
    """x -> c + s (x - c) in mm, sampled on a rotated, left-handed grid, has det s^3 everywhere."""
    theta = 0.4
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    direction = rotation @ np.diag([-1.0, 1.0, 1.0])  # left-handed
    spacing, origin, shape_kji = np.array([1.5, 1.0, 2.0]), np.array([10.0, -5.0, 3.0]), (5, 6, 7)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    index = np.stack([i, j, k], -1).astype(float)
    points = origin + index @ (direction @ np.diag(spacing)).T
    scale, centre = 1.2, np.array([1.0, 2.0, 3.0])
    field = (scale - 1.0) * (points - centre)  # displacement in mm, (K, J, I, 3) xyz
    jac = metrics.physical_jacobian_determinant(field, spacing, direction.ravel())
    np.testing.assert_allclose(jac, scale**3, rtol=1e-5)
    # an anisotropic stretch along physical x only is seen as such whatever the grid's axes
    stretch = np.zeros_like(field)
    stretch[..., 0] = 0.5 * (points[..., 0] - centre[0])
    np.testing.assert_allclose(
        metrics.physical_jacobian_determinant(stretch, spacing, direction.ravel()), 1.5, rtol=1e-5
    )


def test_sd_log_jacobian():
    assert metrics.sd_log_jacobian(np.full((4, 4, 4), 2.0)) == pytest.approx(0.0)
    jac = np.array([1.0, np.e, np.e**2])
    assert metrics.sd_log_jacobian(jac) == pytest.approx(np.std([0.0, 1.0, 2.0]))
    assert np.isfinite(metrics.sd_log_jacobian(np.array([-1.0, 1.0])))


def test_jacobian_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3, D, H, W"):
        metrics.jacobian_determinant(np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.jacobian_determinant(np.zeros((3, 1, 4, 4)))
