"""The shipped model and the README's first command: what a newcomer runs must work from the repository."""

from __future__ import annotations

import json

import pytest

from DTNRegistrationLib.cli import commands as cli
from DTNRegistrationLib.core import models


def test_default_model_is_registered_loads_and_matches_its_checksum():
    registry = models.registry()
    name = registry["default"]
    entry = registry["models"][name]
    assert models.sha256_file(models.MODELS_DIR / entry["file"]) == entry["sha256"]
    loaded = models.load_model()
    assert loaded.name == name and loaded.sha256 == entry["sha256"]
    assert json.loads(json.dumps(loaded.config.to_dict())) == entry["config"]
    assert loaded.spacing_mm == entry["spacing_mm"]
    assert (models.MODELS_DIR / "MODEL_CARD.md").read_text(encoding="utf-8").count(entry["sha256"]) == 1


def test_demo_writes_every_output_and_the_figure(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), "--quiet", "--refine", "2"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "warped_labels.nii.gz", "summary.png"} <= names
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["model"]["name"] == models.registry()["default"]
    # Tissue classes: 0.50 after the affine alone, 0.57 with the network and 2 steps; a network or refinement
    # that stopped registering would fall back to the affine's level.
    assert report["metrics"]["dice_mean"] > 0.54


def test_a_registered_model_whose_file_does_not_match_its_checksum_is_refused(monkeypatch, tmp_path):
    registry = models.registry()
    name = registry["default"]
    tampered = {**registry["models"][name], "sha256": "0" * 64}
    monkeypatch.setattr(models, "registry", lambda: {"default": name, "models": {name: tampered}})
    with pytest.raises(models.ModelError, match="does not match"):
        models.load_model()
    assert cli.main(["demo", "--output-dir", str(tmp_path / "demo"), "--quiet", "--model", name]) == 2
    assert not (tmp_path / "demo" / "report.json").exists()


@pytest.mark.parametrize("bad", ["no-such-model", "missing.safetensors"])
def test_unknown_models_are_refused(bad):
    with pytest.raises(models.ModelError):
        models.load_model(bad)
