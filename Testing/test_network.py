import pytest
import torch
from conftest import image_from_labels, phantom_labels, smooth_displacement, tiny_config

from DTNRegistrationLib.core import losses, metrics, models, spatial
from DTNRegistrationLib.core.network import (
    VARIANTS,
    DTNConfig,
    LearnedPositions,
    build_model,
    count_parameters,
    to_device,
)


@pytest.mark.parametrize("shape", [(144, 160, 192), (160, 192, 224), (32, 48, 64)])
def test_default_model_output_shapes(shape):
    """The paper's grid, Learn2Reg LUMIR's grid and a small non-cubic one: velocity at half resolution."""
    torch.manual_seed(0)
    model = build_model().eval()
    with torch.inference_mode():
        moving, fixed = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
        v, u, warped = model.register(moving, fixed, alpha=0.1)
    assert v.shape == (1, 3, *[n // 2 for n in shape])
    assert u.shape == (1, 3, *shape) and warped.shape == (1, 1, *shape)
    assert torch.isfinite(u).all()


def test_bottleneck_has_paper_channels():
    cfg = DTNConfig()
    assert (cfg.q_s, cfg.q_c, cfg.bottleneck_channels) == (128, 96, 224)
    assert cfg.ts_encoder_layers == 3 and cfg.ts_decoder_layers == 2


@pytest.mark.parametrize(
    "shape, message",
    [((30, 32, 32), "not divisible by 16"), ((32, 32, 8), "not divisible by 16")],
)
def test_bad_sizes_are_refused(tiny_cfg, shape, message):
    model = build_model(tiny_cfg)
    with pytest.raises(ValueError, match=message):
        model(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))


def test_nan_and_mismatched_inputs_are_refused(tiny_cfg):
    model = build_model(tiny_cfg)
    good = torch.rand(1, 1, 32, 32, 32)
    bad = good.clone()
    bad[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="moving contains NaN"):
        model(bad, good)
    with pytest.raises(ValueError, match="differ in shape"):
        model(good, torch.rand(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        model(good[0], good[0])


def test_positional_table_adapts_to_the_grid():
    positions = LearnedPositions(8, (3, 4, 5))
    own = positions((3, 4, 5))
    assert torch.equal(own, positions.table.flatten(2).transpose(1, 2))
    bigger = positions((6, 8, 10))
    assert bigger.shape == (1, 6 * 8 * 10, 8)
    # interpolation keeps the table's range (a smooth resize, not new values)
    assert bigger.max() <= positions.table.max() + 1e-6 and bigger.min() >= positions.table.min() - 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_runs_and_has_its_parts(variant):
    torch.manual_seed(0)
    model = build_model(tiny_config(variant=variant))
    parts = {name for name, _ in model.named_children()}
    assert ("t_s" in parts) == (variant in ("dtn", "dtn_s"))
    assert ("t_c" in parts) == (variant in ("dtn", "dtn_c"))
    assert ("phi_s" in parts) == (variant in ("dtn", "dtn_s"))
    v = model(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32), 0.1)
    assert v.shape == (1, 3, 16, 16, 16)


def test_gradients_reach_both_encoders_and_both_transformers(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    v, _, warped = model.register(moving, fixed, 0.1)
    (losses.l1(warped, fixed) + 0.1 * losses.gradient_smoothness(v) + v.pow(2).mean()).backward()
    for part in ("phi_s", "phi_c", "t_s", "t_c"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert all(g is not None for g in grads), part
        assert sum(float(g.abs().sum()) for g in grads) > 0, part


def test_alpha_conditions_the_output(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    torch.nn.init.normal_(model.film.mlp[-1].weight, std=0.5)  # as after training
    torch.nn.init.normal_(model.velocity_head.weight, std=0.1)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        assert not torch.allclose(model(moving, fixed, 0.01), model(moving, fixed, 1.0))
    fixed_alpha = build_model(tiny_config(alpha_conditioned=False))
    assert fixed_alpha.film is None
    with pytest.raises(ValueError, match="positive"):
        model(moving, fixed, -1.0)


def test_symmetric_velocity_is_inverse_consistent_and_zero_on_identical_images(tiny_cfg):
    """One batched pass of both directions equals the two separate passes; swapping the images negates it."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    torch.nn.init.normal_(model.velocity_head.weight, std=0.1)  # a network that predicts motion
    moving, fixed = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    alpha = torch.tensor([0.03, 0.3])
    with torch.inference_mode():
        v = model.symmetric_velocity(moving, fixed, alpha)
        separate = (model(moving, fixed, alpha) - model(fixed, moving, alpha)) / 2
        assert v.abs().mean() > 1e-3
        torch.testing.assert_close(v, separate, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.symmetric_velocity(fixed, moving, alpha), -v)
        assert model(fixed, fixed, 0.1).abs().max() > 1e-3  # one direction alone moves identical images
        assert model.symmetric_velocity(fixed, fixed, 0.1).abs().max() == 0


def test_cascaded_passes_stay_inverse_consistent_and_add_a_second_pass(tiny_cfg):
    """Each further pass registers the images warped half-way toward each other: swapping the images still negates
    the sum, identical images still give zero, and the second pass changes the first's velocity."""
    torch.manual_seed(1)
    model = build_model(tiny_cfg).eval()
    torch.nn.init.normal_(model.velocity_head.weight, std=0.1)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        one = model.symmetric_velocity(moving, fixed, 0.1)
        two = model.symmetric_velocity(moving, fixed, 0.1, passes=2)
        assert (two - one).abs().mean() > 1e-3
        torch.testing.assert_close(model.symmetric_velocity(fixed, moving, 0.1, passes=2), -two)
        assert model.symmetric_velocity(fixed, fixed, 0.1, passes=3).abs().max() == 0
        # continuing from a start velocity is the same cascade
        torch.testing.assert_close(model.symmetric_velocity(moving, fixed, 0.1, passes=1, start=one), two)
        continued = model.symmetric_velocity(fixed, moving, 0.1, passes=1, start=-one)
        torch.testing.assert_close(continued, -two)


def test_config_round_trip_and_unknown_keys():
    cfg = tiny_config(variant="dtn_c")
    assert DTNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DTN configuration keys"):
        DTNConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown variant"):
        DTNConfig(variant="transmorph")


def test_weights_round_trip_and_corruption(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    path = tmp_path / "m.safetensors"
    digest = models.save_weights(model, path, {"spacing_mm": 2.0})
    loaded = models.load_weights(path, digest)
    assert loaded.config == tiny_cfg and loaded.spacing_mm == 2.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(models.ModelError, match="does not match"):
        models.load_weights(path, digest)
    path.write_bytes(b"not a weights file")
    with pytest.raises(models.ModelError, match="not a readable safetensors"):
        models.load_weights(path)


def test_the_cpu_layout_changes_the_speed_not_the_result(tmp_path, tiny_cfg):
    """On the CPU the network runs with channels-last weights (``to_device``; oneDNN's faster convolutions): the
    same velocity as the default layout, a plain contiguous output, and weights that save and load as before."""
    torch.manual_seed(0)
    plain = build_model(tiny_cfg).eval()
    fast = to_device(build_model(tiny_cfg), "cpu").eval()
    fast.load_state_dict(plain.state_dict())
    conv = fast.phi_c.levels[1][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    moving, fixed = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    with torch.inference_mode():
        expected, velocity = plain(moving, fixed), fast(moving, fixed)
    assert velocity.is_contiguous()
    torch.testing.assert_close(velocity, expected, rtol=1e-4, atol=1e-5)
    models.save_weights(fast, tmp_path / "fast.safetensors")
    loaded = models.load_model(tmp_path / "fast.safetensors")
    assert loaded.model.phi_c.levels[1][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    for key, value in plain.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_model_overfits_one_pair():
    """A small DTN learns one synthetic pair on the CPU: the loss falls and the Dice of its labels rises."""
    torch.manual_seed(0)
    shape = (32, 32, 32)
    labels_fixed = torch.from_numpy(phantom_labels(shape))[None, None]
    true_u = torch.from_numpy(smooth_displacement(shape, 2.5, seed=3))[None]
    labels_moving = spatial.warp(labels_fixed, spatial.integrate(true_u), mode="nearest")
    fixed = torch.from_numpy(image_from_labels(labels_fixed[0, 0].numpy()))[None, None]
    moving = torch.from_numpy(image_from_labels(labels_moving[0, 0].numpy(), seed=1))[None, None]

    model = build_model(tiny_config(enc_channels=(8, 16, 16, 32), dec_channels=(32, 32, 16, 16)))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(120):
        optimiser.zero_grad()
        v, _, warped = model.register(moving, fixed, 0.01)
        loss = losses.mse(warped, fixed) + 0.01 * losses.gradient_smoothness(v)
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
    with torch.inference_mode():
        _, u, _ = model.register(moving, fixed, 0.01)
    warped_labels = spatial.warp(labels_moving, u, mode="nearest")[0, 0].numpy()
    before = metrics.mean_dice(labels_moving[0, 0].numpy(), labels_fixed[0, 0].numpy())
    after = metrics.mean_dice(warped_labels, labels_fixed[0, 0].numpy())
    assert history[-1] < 0.6 * history[0]
    assert after > before + 0.05, (before, after)
    assert count_parameters(model) > 0


def test_features_keep_their_scale_down_to_the_velocity_head():
    """He initialisation: the decoder's features reach the head at the input's scale, not at ~1 % of it (PyTorch's
    default convolution initialisation), which left a near-zero head unable to grow in the paper's step budget."""
    torch.manual_seed(0)
    model = build_model(DTNConfig(alpha_conditioned=False))
    seen = {}
    model.velocity_head.register_forward_hook(lambda module, inputs, output: seen.update(std=inputs[0].std().item()))
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        model(moving, fixed)
    assert seen["std"] > 0.3 * float(moving.std())
