"""Training: the loss goes down, resume is exact, checkpoints are safe and checked, DDP keeps ranks in step."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
import torch.multiprocessing as mp

from DTNRegistrationLib.core import models
from DTNRegistrationLib.errors import ModelError
from DTNRegistrationLib.train import checkpoints, run_log, steps, synth
from DTNRegistrationLib.train import cli as train_cli
from DTNRegistrationLib.train import pairs as pair_sources
from DTNRegistrationLib.train import trainer as training
from DTNRegistrationLib.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SHAPE = (32, 32, 32)
SMALL = dict(enc_channels=(4, 8, 16, 16), q_s=32, q_c=32, dec_channels=(32, 16, 16, 8), heads=2)  # fast tests


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    values = dict(
        output_dir=str(out),
        synthetic=True,
        shape=SHAPE,
        max_steps=4,
        threads=1,
        val_every=0,
        checkpoint_every=2,
        log_every=1,
        progress=False,
        model_options=SMALL,
    )
    return TrainConfig.from_dict(values | kw)


def losses_by_step(out: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in run_log.read_log(out) if r["source"] != "validation"}


def write_heads(folder: Path, n: int = 2) -> Path:
    """Tiny noisy ellipsoid 'heads' at 2 mm (enough for the real-image path)."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    for i in range(n):
        r = (x / 0.8) ** 2 + (y / (0.7 + 0.05 * i)) ** 2 + (z / 0.75) ** 2
        image = 100.0 * (r < 1) + 80.0 * (r < 0.3) + rng.normal(0, 2, r.shape)
        img = sitk.GetImageFromArray(image.astype(np.float32))
        img.SetSpacing([2.0] * 3)
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(folder / f"head{i}.nii.gz"))
    return folder


# ---------------------------------------------------------------------------------------------- learning


class FixedPair:
    """A source that always gives the same pair: the loss on it must go down (overfitting is learning)."""

    last = "synthetic"

    def __init__(self, pair) -> None:
        self.pair = pair

    def sample(self, gen, batch=1):
        return self.pair


def _similarity(trainer: training.Trainer, pair) -> float:
    with torch.no_grad():
        _, parts = steps.compute_loss(trainer.core, trainer.core, pair, 0.1, trainer.cfg, False, False)
    return parts["similarity"]


def test_a_few_steps_lower_the_loss(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", max_steps=15, lr=1e-3, checkpoint_every=0, dice_weight=0.5)
    trainer = training.Trainer(cfg)
    pair = pair_sources.validation_pairs(None, SHAPE, 1, seed=321)[0][1]
    trainer.sources = FixedPair(pair)
    before = _similarity(trainer, pair)
    trainer.run()
    after = _similarity(trainer, pair)
    assert after < 0.85 * before, (before, after)
    rows = [r for r in run_log.read_log(tmp_path / "run") if r["source"] == "synthetic"]
    assert len(rows) == 15 and all(r["dice_loss"] != "" for r in rows)
    assert (tmp_path / "run" / checkpoints.FINAL_WEIGHTS).is_file()


@pytest.mark.parametrize("symmetric", [False, True])
def test_field_term_pulls_the_prediction_towards_the_true_field(tmp_path, symmetric):
    """Also when the symmetric velocity the pipeline uses is trained (``--symmetric``): the loss is then its own."""
    pair = pair_sources.validation_pairs(None, SHAPE, 1, seed=5)[0][1]
    cfg = tiny_cfg(tmp_path / "run", max_steps=20, lr=1e-3, checkpoint_every=0, field_weight=1.0, symmetric=symmetric)
    trainer = training.Trainer(cfg)
    trainer.sources = FixedPair(pair)

    def error() -> float:
        with torch.no_grad():
            _, parts = steps.compute_loss(trainer.core, trainer.core, pair, 0.1, trainer.cfg, False, False)
            v = trainer.core.symmetric_velocity(pair.moving, pair.fixed, 0.1) if symmetric else None
        if v is not None:
            u = trainer.core.displacement(v, SHAPE)
            assert parts["field_error"] == pytest.approx(steps.end_point_error(u, pair.displacement).item(), rel=1e-4)
        return parts["field_error"]

    before = error()
    trainer.run()
    assert error() < 0.8 * before
    rows = run_log.read_log(tmp_path / "run")
    assert len(rows) == 20 and all(r["field_error"] != "" for r in rows)


@pytest.mark.parametrize("field_weight", [0.0, 0.5])
def test_synthetic_pairs_carry_their_true_field_only_when_the_loss_uses_it(tmp_path, field_weight):
    trainer = training.Trainer(tiny_cfg(tmp_path / "run", field_weight=field_weight))
    pair = trainer.sources.sample(synth.make_generator(0))
    assert (pair.displacement is not None) == (field_weight > 0)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_continues_exactly(tmp_path):
    heads = write_heads(tmp_path / "heads")
    common = dict(images_dir=str(heads), align="none", synth_fraction=0.5, val_every=2, val_synthetic=1)
    full = tmp_path / "full"
    training.train(tiny_cfg(full, **common))
    part = tmp_path / "part"
    training.train(tiny_cfg(part, max_steps=2, **common))
    args = train_cli.parse_args(["--resume", str(part), "--max-steps", "4"])
    assert train_cli.main(args) == 0
    a, b = losses_by_step(full), losses_by_step(part)
    assert sorted(b) == [1, 2, 3, 4]
    sources = {r["source"] for r in run_log.read_log(full)}
    assert {"real", "synthetic", "validation"} <= sources, sources  # every path of a step is exercised
    for step in (1, 2, 3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6, rel=0), step
    wa = models.read_weights(full / checkpoints.FINAL_WEIGHTS)[0]
    wb = models.read_weights(part / checkpoints.FINAL_WEIGHTS)[0]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_state_is_weights_only_and_complete(tmp_path):
    training.train(tiny_cfg(tmp_path, max_steps=2))
    state = torch.load(tmp_path / checkpoints.STATE_FILE, weights_only=True)
    assert state["step"] == 2
    assert {"python", "numpy", "torch", "data"} <= set(state["rng"][0])
    assert state["optimizer"]["state"]
    info = models.read_weights(tmp_path / checkpoints.LAST_WEIGHTS)[2]
    assert info["step"] == 2 and info["spacing_mm"] == 2.0 and "synthetic" in info["training_data"]
    loaded = models.load_weights(tmp_path / checkpoints.FINAL_WEIGHTS)
    assert loaded.config.variant == "dtn" and loaded.config.alpha_conditioned


# ---------------------------------------------------------------------------------------------- safety


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    training.train(tiny_cfg(out, max_steps=2, variant="dtn_c"))
    return out


def test_truncated_state_is_refused(trained, tmp_path):
    bad = tmp_path / checkpoints.STATE_FILE
    bad.write_bytes((trained / checkpoints.STATE_FILE).read_bytes()[:5000])
    with pytest.raises(ModelError, match="damaged or truncated"):
        checkpoints.load_state(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        checkpoints.load_state(tmp_path / "nothing")


def test_corrupted_weights_are_refused(trained, tmp_path):
    weights = trained / checkpoints.FINAL_WEIGHTS
    with pytest.raises(ModelError, match="does not match"):
        models.load_weights(weights, expected_sha256="0" * 64)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError):
        models.load_weights(bad)


def test_checkpoint_of_another_architecture_is_refused(trained, tmp_path):
    with pytest.raises(ModelError, match="another architecture.*variant"):
        training.Trainer(tiny_cfg(tmp_path / "r", resume=str(trained), variant="none"))
    with pytest.raises(ModelError, match="another architecture"):
        training.Trainer(tiny_cfg(tmp_path / "i", init=str(trained / checkpoints.FINAL_WEIGHTS), variant="dtn"))


def test_fine_tuning_from_weights_of_the_same_architecture(trained, tmp_path):
    trainer = training.Trainer(tiny_cfg(tmp_path, init=str(trained / checkpoints.FINAL_WEIGHTS), variant="dtn_c"))
    expected = models.read_weights(trained / checkpoints.FINAL_WEIGHTS)[0]
    assert all(torch.equal(v.cpu(), expected[k]) for k, v in trainer.core.state_dict().items())


def test_a_write_killed_midway_leaves_the_last_checkpoint(trained, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    out.mkdir()
    for name in (checkpoints.STATE_FILE, checkpoints.LAST_WEIGHTS, training.CONFIG_FILE, run_log.LOG_FILE):
        (out / name).write_bytes((trained / name).read_bytes())
    trainer = training.Trainer(tiny_cfg(out, resume=str(out), variant="dtn_c", max_steps=3))
    assert trainer.step == 2
    trainer.train_step()

    def dying_save(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(0.0)
    monkeypatch.undo()
    assert checkpoints.load_state(out)["step"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_time_limit_stops_and_saves(tmp_path):
    final = training.train(tiny_cfg(tmp_path, max_steps=1000, max_minutes=1e-4, checkpoint_every=0))
    assert final.is_file()
    assert 1 <= checkpoints.load_state(tmp_path)["step"] < 1000


# ---------------------------------------------------------------------------------------------- command line


def test_command_line_bad_input_gives_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = train_cli.parse_args(["--output-dir", str(tmp_path / "o"), "--images-dir", str(tmp_path / "empty")])
    assert train_cli.main(args) == 2
    assert "no images" in capsys.readouterr().err
    assert train_cli.main(train_cli.parse_args(["--resume", str(tmp_path / "nothing")])) == 2
    assert "not found" in capsys.readouterr().err


def test_command_line_options_map_onto_the_config():
    args = train_cli.parse_args(
        ["--output-dir", "o", "--synthetic", "--shape", "32", "48", "64", "--no-alpha-conditioned", "--alpha", "0.2"]
    )
    cfg = train_cli.config_from_args(args)
    assert cfg.data.shape == (32, 48, 64) and cfg.synthetic and not cfg.alpha_conditioned and cfg.alpha == 0.2
    assert cfg.similarity == "l1" and cfg.lr == 1e-4 and cfg.betas == (0.5, 0.999) and cfg.batch_size == 1


# ---------------------------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    cfg = tiny_cfg(Path(out), max_steps=3, threads=1, checkpoint_every=2, device="cpu")
    trainer = training.Trainer(cfg)
    trainer.run()
    torch.save(trainer.core.state_dict(), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_stay_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    state = checkpoints.load_state(tmp_path)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 3
    assert not torch.equal(state["rng"][0]["data"], state["rng"][1]["data"])  # each rank its own pairs
    init = training.Trainer(tiny_cfg(tmp_path / "fresh", device="cpu")).core.state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0)  # and they did train
