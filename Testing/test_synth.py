"""Synthetic pair generator and augmentation: determinism, ranges, and diffeomorphic deformations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DTNRegistrationLib.core import metrics, spatial
from DTNRegistrationLib.train import pairs, synth

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SHAPE = (32, 32, 32)


def test_pair_shapes_types_and_ranges():
    pair = synth.synth_pair(synth.make_generator(0), SHAPE, batch=2)
    for image in (pair.moving, pair.fixed):
        assert image.shape == (2, 1, *SHAPE) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert torch.isfinite(image).all()
    for labels in (pair.moving_labels, pair.fixed_labels):
        assert labels.shape == (2, 1, *SHAPE) and labels.dtype == torch.int64
        assert 0 <= int(labels.min()) and int(labels.max()) < synth.SynthConfig().num_labels
    assert not torch.equal(pair.moving, pair.fixed)


def test_same_seed_same_pair_other_seed_other_pair():
    a = synth.synth_pair(synth.make_generator(7), SHAPE)
    b = synth.synth_pair(synth.make_generator(7), SHAPE)
    c = synth.synth_pair(synth.make_generator(8), SHAPE)
    assert torch.equal(a.moving, b.moving) and torch.equal(a.fixed_labels, b.fixed_labels)
    assert not torch.equal(a.moving, c.moving)


def test_generator_state_round_trip_continues_the_stream():
    gen = synth.make_generator(3)
    synth.synth_pair(gen, SHAPE)
    state = gen.get_state()
    expected = synth.synth_pair(gen, SHAPE)
    gen2 = synth.make_generator(99)
    gen2.set_state(state)
    assert torch.equal(synth.synth_pair(gen2, SHAPE).fixed, expected.fixed)


def test_pair_without_true_field_is_the_same_pair_and_stream():
    gen_a, gen_b = synth.make_generator(5), synth.make_generator(5)
    with_field = synth.synth_pair(gen_a, SHAPE)
    without = synth.synth_pair(gen_b, SHAPE, true_field=False)
    assert with_field.displacement is not None and without.displacement is None
    assert torch.equal(with_field.moving, without.moving) and torch.equal(with_field.fixed, without.fixed)
    assert torch.equal(synth.synth_pair(gen_a, SHAPE).fixed, synth.synth_pair(gen_b, SHAPE).fixed)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_deformations_are_diffeomorphic(seed):
    cfg = synth.SynthConfig()
    gen = synth.make_generator(seed)
    for std in (cfg.template_warp_std, cfg.pair_warp_std):
        u = synth.random_deformation(gen, 1, (48, 48, 48), std, cfg.warp_divisor)
        jac = metrics.jacobian_determinant(u[0].numpy())
        assert jac.min() > 0, f"folding with std {std}"
    assert float(u.abs().max()) > 0.1  # it does deform


@pytest.mark.parametrize("seed", [0, 1])
def test_true_field_carries_the_moving_labels_onto_the_fixed_ones(seed):
    pair = synth.synth_pair(synth.make_generator(seed), (48, 48, 48))
    assert pair.displacement.shape == (1, 3, 48, 48, 48)

    def dice(u):  # nearest-neighbour label warping costs about 0.1 on these small, fragmented labels
        moved = spatial.warp(pair.moving_labels, u, mode="nearest")
        return metrics.mean_dice(moved.numpy(), pair.fixed_labels.numpy())

    before, after = dice(torch.zeros_like(pair.displacement)), dice(pair.displacement)
    reversed_ = dice(-pair.displacement)
    assert after > 0.85 and after > before + 0.08 and reversed_ < before, (before, after, reversed_)
    assert metrics.jacobian_determinant(pair.displacement[0].numpy()).min() > 0


def test_inverse_deformation_undoes_the_forward_one():
    forward, backward = synth.random_deformation_and_inverse(synth.make_generator(4), 1, (40, 40, 40), 3.0, 16)
    round_trip = spatial.compose(backward, forward)  # backward o forward: the identity
    inner = (slice(None), slice(None), *[slice(6, -6)] * 3)  # away from the border's clamping
    assert float(forward.abs().max()) > 1.0
    assert float(round_trip[inner].abs().max()) < 0.1 * float(forward.abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_augmentation_field_is_diffeomorphic(seed):
    u = synth.random_spatial_field(synth.make_generator(seed), 1, (48, 48, 48), synth.AugmentConfig())
    assert metrics.jacobian_determinant(u[0].numpy()).min() > 0
    # a zero field is diffeomorphic too: it must also move voxels by several voxels somewhere, one on average
    magnitude = u.norm(dim=1)
    assert float(magnitude.max()) > 3.0 and float(magnitude.mean()) > 1.0


def test_affine_field_identity_with_zero_ranges():
    cfg = synth.AugmentConfig(rotation_deg=0, scale=0, shear=0, translation=0)
    u = synth.random_affine_field(synth.make_generator(0), 1, SHAPE, cfg)
    assert float(u.abs().max()) < 1e-4


def test_augment_keeps_labels_integer_and_deterministic():
    pair = synth.synth_pair(synth.make_generator(0), SHAPE)
    img1, lab1 = synth.augment(synth.make_generator(5), pair.moving, pair.moving_labels)
    img2, lab2 = synth.augment(synth.make_generator(5), pair.moving, pair.moving_labels)
    assert torch.equal(img1, img2) and torch.equal(lab1, lab2)
    assert lab1.dtype == torch.int64
    assert set(np.unique(lab1.numpy())) <= set(np.unique(pair.moving_labels.numpy()))
    assert float(img1.min()) >= 0 and float(img1.max()) <= 1


def test_augment_without_spatial_part_leaves_geometry():
    image = torch.zeros(1, 1, *SHAPE)
    image[..., 8:24, 8:24, 8:24] = 1.0
    labels = (image > 0.5).long()
    _, lab = synth.augment(synth.make_generator(0), image, labels, spatial_aug=False)
    assert torch.equal(lab, labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augment_moves_labels_and_image_alike(seed):
    """The spatial part moves the cube's labels (a few percent of the voxels change, but it stays a cube), and
    the image with them: bright inside the moved label, dark outside."""
    image = torch.zeros(1, 1, *SHAPE)
    image[..., 8:24, 8:24, 8:24] = 1.0
    labels = (image > 0.5).long()
    img, lab = synth.augment(synth.make_generator(seed), image, labels)
    changed = float((lab != labels).float().mean())
    assert changed > 0.02, changed
    # moved, not scrambled: about the same volume (scales within 8 %), still overlapping the original
    assert 0.7 < float(lab.sum()) / float(labels.sum()) < 1.4
    assert metrics.dice(lab.numpy(), labels.numpy())[1] > 0.4
    inside, outside = img[lab == 1], img[lab == 0]
    assert float(inside.mean()) > float(outside.mean()) + 0.7


def test_real_pairs_move_labels_with_the_images():
    """Augmented real pairs (pairs.RealPairSource) deform both images and their labels alike: intensity
    augmentation alone would leave every label map equal to a training subject's."""
    volumes = []
    for name, (lo, hi) in (("a", (8, 24)), ("b", (6, 20))):
        labels = np.zeros(SHAPE, np.int64)
        labels[lo:hi, lo:hi, lo:hi] = 1
        volumes.append(pairs.Volume(name, (0.8 * labels).astype(np.float32), labels))
    source = pairs.RealPairSource(pairs.RealData(volumes))
    pair = source.sample(synth.make_generator(0), batch=3)
    again = source.sample(synth.make_generator(0), batch=3)
    assert torch.equal(pair.moving, again.moving) and torch.equal(pair.fixed_labels, again.fixed_labels)
    for images, label_maps in ((pair.moving, pair.moving_labels), (pair.fixed, pair.fixed_labels)):
        for image, lab in zip(images[:, 0], label_maps[:, 0].numpy()):
            changed = min(float(np.mean(lab != v.labels)) for v in volumes)
            assert changed > 0.02, changed
            assert float(image[lab == 1].mean()) > float(image[lab == 0].mean()) + 0.7


def _label_mean_differences(cfg: synth.SynthConfig, seed: int = 0) -> np.ndarray:
    """Mean intensity of each label in the moving image minus that in the fixed one (labels both maps have)."""
    pair = synth.synth_pair(synth.make_generator(seed), SHAPE, cfg=cfg)
    assert pair.moving.shape == (1, 1, *SHAPE)
    moving, fixed = pair.moving[0, 0].numpy(), pair.fixed[0, 0].numpy()
    ml, fl = pair.moving_labels[0, 0].numpy(), pair.fixed_labels[0, 0].numpy()
    common = sorted(set(np.unique(ml)) & set(np.unique(fl)))
    assert len(common) >= cfg.num_labels - 2
    return np.array([moving[ml == lab].mean() - fixed[fl == lab].mean() for lab in common])


# No texture, bias, blur or noise: a label's intensity is its mean, so the contrasts can be compared directly.
CLEAN = dict(texture_std=0.0, bias_std=0.0, blur_max=0.0, noise_max=0.0)


def test_independent_contrast_and_bad_config():
    jitter = synth.SynthConfig().intensity_jitter
    # shared: the fixed image's label means are the moving ones plus a N(0, jitter) jitter...
    shared = _label_mean_differences(synth.SynthConfig(**CLEAN))
    rms = float(np.sqrt(np.mean(shared**2)))
    assert 0.5 * jitter < rms < 1.6 * jitter and np.abs(shared).max() < 4 * jitter, shared
    # ... and without jitter exactly the same
    assert np.abs(_label_mean_differences(synth.SynthConfig(intensity_jitter=0.0, **CLEAN))).max() < 1e-5
    # independent: unrelated means, most labels far apart
    independent = _label_mean_differences(synth.SynthConfig(contrast="independent", **CLEAN))
    assert np.mean(np.abs(independent) > jitter) > 2 / 3, independent
    assert float(np.sqrt(np.mean(independent**2))) > 4 * jitter
    with pytest.raises(ValueError, match="contrast"):
        synth.SynthConfig(contrast="weird")


def test_gaussian_blur_preserves_constants():
    x = torch.full((1, 1, 8, 8, 8), 0.5)
    assert torch.allclose(synth.gaussian_blur(x, 1.0), x)


@pytest.mark.parametrize("sigma", [0.8, 1.5])
def test_gaussian_blur_of_an_impulse_is_the_gaussian(sigma):
    """A unit impulse blurs into the separable, normalised sampled Gaussian of that sigma (which the constant
    test cannot tell from no blur at all): it sums to 1 and its variance along each axis is sigma^2 voxels."""
    n, c = 21, 10
    x = torch.zeros(1, 1, n, n, n, dtype=torch.float64)
    x[0, 0, c, c, c] = 1.0
    y = synth.gaussian_blur(x, sigma)[0, 0].numpy()
    t = np.arange(n) - c
    g = np.where(np.abs(t) <= np.ceil(3 * sigma), np.exp(-0.5 * (t / sigma) ** 2), 0.0)  # cut at 3 sigma
    g /= g.sum()
    np.testing.assert_allclose(y, np.einsum("i,j,k->ijk", g, g, g), atol=1e-12)
    assert y.sum() == pytest.approx(1.0)
    for axis in range(3):
        profile = y.sum(axis=tuple(a for a in range(3) if a != axis))
        assert float((profile * t).sum()) == pytest.approx(0.0, abs=1e-12)
        assert float((profile * t**2).sum()) == pytest.approx(sigma**2, rel=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_generator():
    pair = synth.synth_pair(synth.make_generator(0, "cuda"), SHAPE)
    assert pair.moving.is_cuda and pair.moving_labels.is_cuda
