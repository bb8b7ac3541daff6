"""The one-command GPU job, run for a few steps on the CPU in a process where SimpleITK cannot be imported
(as on the GPU machine), so that a broken job is caught before GPU minutes are spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from DTNRegistrationLib.core import models
from DTNRegistrationLib.train import pairs, synth

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)


def write_bundle(folder: Path) -> Path:
    """Two labelled 'subjects' on a small grid, as scripts/make_gpu_bundle.py writes them."""
    gen = synth.make_generator(5)
    volumes = []
    for i in range(2):
        pair = synth.synth_pair(gen, SHAPE, 1, synth.SynthConfig(num_labels=4))
        volumes.append(pairs.Volume(f"subject{i}", pair.moving[0, 0].numpy(), pair.moving_labels[0, 0].numpy()))
    folder.mkdir()
    return pairs.save_prepared(folder / "real.npz", pairs.RealData(volumes, description="test subjects"))


@pytest.fixture(scope="module")
def job_output(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("gpu-job")
    write_bundle(tmp / "bundle")
    blocker = tmp / "blocker" / "SimpleITK"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('SimpleITK is not installed on the GPU machine')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker.parent))
    command = [sys.executable, str(ROOT / "scripts" / "gpu_job.py"), "--bundle", str(tmp / "bundle")]
    command += ["--out", str(tmp / "out"), "--device", "cpu", "--minutes", "2", "--steps", "3", "--batch", "2"]
    command += ["--warmup", "2", "--val-every", "2", "--val-pairs", "1", "--bench-sizes", "32x32x32"]
    command += ["--bench-runs", "1", "--no-register", "--field-weight", "0.1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return result, tmp / "out"


def test_job_trains_without_simpleitk_and_its_results_fit_what_comes_back(job_output):
    result, out = job_output
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files)
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    assert {p.name for p in files} == {
        "dtn.safetensors",
        "dtn-best.safetensors",
        "dtn-log.csv",
        "validation.json",
        "benchmark.json",
    }


def test_job_continues_from_the_shipped_weights_and_validates_before_and_after(job_output):
    _, out = job_output
    validation = json.loads((out / "validation.json").read_text())
    run = validation["runs"]["dtn"]
    assert run["training"]["steps"] == 3
    assert run["training"]["init"].endswith(models.registry()["models"][models.registry()["default"]]["file"])
    for label in ("init", "final"):
        assert set(run[label]) == {"synthetic", "real_known_deformation", "real_cross_subject"}
        assert 0.0 <= run[label]["synthetic"]["dice"] <= 1.0
    # the scores are real: the shipped network registers the job's held-out synthetic pairs
    assert run["init"]["synthetic"]["dice"] > validation["identity"]["synthetic"]["dice"] + 0.05, validation
    assert validation["identity"]["real_known_deformation"]["pairs"] == 2 * 2  # two deformations per subject
    assert validation["failures"] == []
    shipped = models.load_model(None).model.state_dict()
    trained = models.load_weights(out / "dtn.safetensors")
    assert trained.info["spacing_mm"] == 2.0 and trained.info["step"] == 3 and trained.info["field_weight"] == 0.1
    changed = [k for k, v in trained.model.state_dict().items() if not torch.equal(v, shipped[k])]
    assert changed, "three optimiser steps left every weight as it was"


def test_job_times_inference_and_logs_training(job_output):
    _, out = job_output
    bench = json.loads((out / "benchmark.json").read_text())
    timings = [(r["size"], r["precision"], r["directions"], r["layout"]) for r in bench["inference"]]
    assert timings == [
        ("32x32x32", "fp32", direction, layout)
        for layout in ("default", "channels-last")
        for direction in ("one", "symmetric")
    ]
    assert all(r["median_s"] > 0 for r in bench["inference"])
    rows = (out / "dtn-log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 2


def test_prepared_bundle_round_trip_and_errors(tmp_path):
    path = write_bundle(tmp_path / "b")
    real = pairs.load_prepared(path)
    assert [v.name for v in real.train] == ["subject0", "subject1"]
    assert real.train[0].image.shape == SHAPE and real.train[0].image.dtype == np.float32
    assert real.train[0].labels.dtype == np.int64 and real.train[0].labels.max() > 0
    with pytest.raises(ValueError, match="file not found"):
        pairs.load_prepared(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no 'meta'"):
        pairs.load_prepared(tmp_path / "other.npz")
