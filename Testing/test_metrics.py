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


@pytest.mark.parametrize("slab", [1, 5, 64])
def test_physical_jacobian_of_a_curved_field_matches_a_whole_volume_reference(monkeypatch, slab):
    """A sinusoidal field on an oblique, flipped grid of 23 slices, cut into slabs of 1, 5 (a short last slab)
    or one block: every slab's values equal the whole-volume np.gradient reference (a linear field has the same
    derivative everywhere, so it cannot tell a slab that keeps the wrong slices)."""
    monkeypatch.setattr(metrics, "JACOBIAN_SLAB", slab)
    a, b = 0.5, 0.3
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    # oblique and left-handed, and not symmetric (a rotation times a flip across its axis would be: its own
    # transpose and inverse, blind to a transposed direction matrix)
    direction = about_z @ about_x @ np.diag([1.0, -1.0, 1.0])
    assert not np.allclose(direction, direction.T)
    spacing, origin, shape_kji = np.array([1.2, 0.9, 1.5]), np.array([-4.0, 7.0, 2.0]), (23, 6, 7)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    index_to_physical = direction @ np.diag(spacing)
    points = origin + np.stack([i, j, k], -1).astype(float) @ index_to_physical.T
    amplitude = np.array([0.9, 0.6, 1.1])
    waves = np.array([[0.1, 0.25, 0.3], [0.2, -0.1, 0.35], [-0.15, 0.2, 0.25]])  # rad/mm, mixes all axes
    phase = points @ waves.T + np.array([0.3, 1.1, -0.4])
    field = amplitude * np.sin(phase)  # (K, J, I, 3) xyz in mm

    # Reference: np.gradient over the whole volume (central inside, one-sided at the borders, as documented),
    # index derivatives mapped to physical ones, and a generic determinant.
    dk, dj, di = np.gradient(field, axis=(0, 1, 2))
    grad_index = np.stack([di, dj, dk], -1)  # [..., component, index axis i/j/k]
    reference = np.linalg.det(np.eye(3) + grad_index @ np.linalg.inv(index_to_physical))
    assert reference.std() > 0.1  # the determinant varies from slice to slice

    jac = metrics.physical_jacobian_determinant(field, spacing, direction.ravel())
    assert jac.shape == shape_kji and jac.dtype == np.float32
    np.testing.assert_allclose(jac, reference, rtol=0, atol=2e-5)

    # and the reference is the field's true Jacobian up to the finite differences' error (inside the borders)
    analytic = np.linalg.det(np.eye(3) + (amplitude * np.cos(phase))[..., None] * waves)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(reference[inner], analytic[inner], atol=0.05)


def test_sd_log_jacobian():
    assert metrics.sd_log_jacobian(np.full((4, 4, 4), 2.0)) == pytest.approx(0.0)
    jac = np.array([1.0, np.e, np.e**2])
    assert metrics.sd_log_jacobian(jac) == pytest.approx(np.std([0.0, 1.0, 2.0]))
    # a fold is clipped to 1e-9 before the log: the SD of (log 1e-9, 0) is half of -log 1e-9
    assert metrics.sd_log_jacobian(np.array([-1.0, 1.0])) == pytest.approx(-np.log(1e-9) / 2, rel=1e-12)


@pytest.mark.parametrize("chunk", [7, 50, 10**6])
def test_sd_log_jacobian_merges_chunks_exactly(monkeypatch, chunk):
    """Chunks of 7 or 50 values whose means differ (values near 1, then near e, with folds and huge values
    clipped), and one chunk: the merged SD equals numpy's over all values at once, so the between-chunk term of
    the merge is right."""
    monkeypatch.setattr(metrics, "SD_CHUNK", chunk)
    rng = np.random.default_rng(0)
    jac = np.concatenate([rng.uniform(0.9, 1.1, 60), rng.uniform(2.5, 2.9, 43)])
    jac[[10, 70]] = [-0.5, 1e12]  # clipped to 1e-9 and 1e9
    expected = np.std(np.log(np.clip(jac, 1e-9, 1e9)))
    assert metrics.sd_log_jacobian(jac) == pytest.approx(expected, rel=1e-12)
    # without the outliers the spread is mostly between the two halves' means (0 and ~1), not within them
    calm = np.delete(jac, [10, 70])
    within = np.sqrt((60 * np.var(np.log(calm[:60])) + 41 * np.var(np.log(calm[60:]))) / calm.size)
    sd = metrics.sd_log_jacobian(calm)
    assert sd == pytest.approx(np.std(np.log(calm)), rel=1e-12) and sd > 3 * within
    mask = np.arange(jac.size) % 3 != 0
    masked = metrics.sd_log_jacobian(jac, mask)
    assert masked == pytest.approx(np.std(np.log(np.clip(jac[mask], 1e-9, 1e9))), rel=1e-12)


def test_jacobian_rejects_bad_shapes():
    with pytest.raises(ValueError, match="3, D, H, W"):
        metrics.jacobian_determinant(np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.jacobian_determinant(np.zeros((3, 1, 4, 4)))
