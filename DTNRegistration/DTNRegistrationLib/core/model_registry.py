"""The shipped models' registry and what a weights file says about itself, read without torch.

The one reader of ``Resources/Models/models.json`` (``{"default": NAME, "models": {NAME: {"file", "sha256",
...}}}``) and of a safetensors file's metadata, shared by ``models`` (which loads weights) and the Slicer panel
(which describes a model before torch is installed).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import ModelError
from ..files import RESOURCES_DIR

MODELS_DIR = RESOURCES_DIR / "Models"
REGISTRY_NAME = "models.json"
REGISTRY_FILE = MODELS_DIR / REGISTRY_NAME


def registry(models_dir: str | os.PathLike = MODELS_DIR) -> dict:
    """The registry of ``models_dir``; an empty one where it is missing. Raises ``ModelError`` where unreadable."""
    path = Path(models_dir) / REGISTRY_NAME
    if not path.is_file():
        return {"default": None, "models": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: the model registry cannot be read ({err})") from err


def weights_metadata(path: str | os.PathLike) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its JSON header (no torch, no safetensors)."""
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        if length > 100_000_000:  # the safetensors format caps its header at 100 MB
            raise ValueError("not a safetensors file")
        header = json.loads(stream.read(length))
    return header.get("__metadata__", {}) or {}


def weights_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """A weights file's network configuration and its extra information (e.g. ``spacing_mm``).

    Raises ``OSError``, ``ValueError`` or ``struct.error`` where the file cannot be read as DTN weights.
    """
    metadata = weights_metadata(path)
    return json.loads(metadata.get("dtn_config", "{}")), json.loads(metadata.get("info", "{}"))


__all__ = ["MODELS_DIR", "REGISTRY_FILE", "registry", "weights_config", "weights_metadata"]
