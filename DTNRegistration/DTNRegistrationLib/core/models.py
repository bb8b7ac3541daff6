"""Model weights as data: safetensors files (no pickle), SHA-256 checks, and the registry of shipped models.

A weights file carries its architecture in its metadata (``dtn_config``, JSON) and, under ``info`` (JSON),
what inference needs to prepare images as in training: ``spacing_mm`` (the model grid's isotropic
spacing) and anything else worth recording (training data, steps, similarity).
The registry ``Resources/Models/models.json`` names the shipped files with their SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ModelError
from ..files import atomic_write
from .model_registry import MODELS_DIR, REGISTRY_FILE, registry
from .network import DTN, DTNConfig, build_model, to_device

DEFAULT_SPACING_MM = 2.0


@dataclass
class LoadedModel:
    """A ready-to-run network with what is known about it."""

    model: DTN
    name: str
    sha256: str
    info: dict = field(default_factory=dict)

    @property
    def config(self) -> DTNConfig:
        return self.model.cfg

    @property
    def spacing_mm(self) -> float:
        return float(self.info.get("spacing_mm", DEFAULT_SPACING_MM))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(model: DTN, path: str | os.PathLike, info: dict | None = None) -> str:
    """Write ``model`` as safetensors with its configuration; returns the file's SHA-256."""
    metadata = {"dtn_config": json.dumps(model.cfg.to_dict()), "info": json.dumps(info or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return sha256_file(path)


def read_weights(path: str | os.PathLike, expected_sha256: str | None = None):
    """Tensors, configuration and info of a weights file, checked against ``expected_sha256`` if given."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise ModelError(f"{path}: SHA-256 {digest} does not match the expected {expected_sha256}; the file is corrupt")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable safetensors weights file ({err})") from err
    if "dtn_config" not in metadata:
        raise ModelError(f"{path}: no 'dtn_config' in its metadata; not a DTNRegistration weights file")
    config = DTNConfig.from_dict(json.loads(metadata["dtn_config"]))
    info = json.loads(metadata.get("info", "{}"))
    return tensors, config, info, digest


def load_weights(path: str | os.PathLike, expected_sha256: str | None = None, name: str | None = None) -> LoadedModel:
    """Build the network a weights file describes and load its tensors (strictly)."""
    tensors, config, info, digest = read_weights(path, expected_sha256)
    model = build_model(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ModelError(f"{path}: weights do not fit the architecture in its metadata: {err}") from err
    return LoadedModel(model.eval(), name or Path(path).stem, digest, info)


def load_model(name_or_path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a shipped model by name (``None`` for the default) or any weights file by path."""
    reg = registry()
    key = name_or_path if name_or_path is not None else reg.get("default")
    if key is None:
        raise ModelError("no model given and no default model is registered in " + str(REGISTRY_FILE))
    entry = reg["models"].get(str(key))
    if entry is not None:
        loaded = load_weights(MODELS_DIR / entry["file"], entry["sha256"], name=str(key))
    elif Path(key).suffix == ".safetensors" or Path(key).is_file():
        loaded = load_weights(key)
    else:
        names = ", ".join(sorted(reg["models"])) or "none"
        raise ModelError(f"unknown model {key!r}: not a weights file, and not a shipped model ({names})")
    to_device(loaded.model, device)
    return loaded
