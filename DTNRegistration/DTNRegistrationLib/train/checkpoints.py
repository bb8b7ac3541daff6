"""Training checkpoints: the state file a resume needs (weights-only loadable), RNG states, architecture checks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..core.network import DTNConfig
from ..errors import ModelError

STATE_FILE = "last.state.pt"
LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
FINAL_WEIGHTS = "model.safetensors"
STATE_FORMAT = 1
# DTNConfig fields that do not change the parameters (may differ between a checkpoint and a run).
NON_ARCHITECTURE_KEYS = ("alpha", "alpha_range", "integration_steps")


def rng_state(gen: torch.Generator) -> dict:
    """Every random state the run depends on, as tensors and plain values (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_plain(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_to_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
        "data": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    """Restore what ``rng_state`` saved."""
    random.setstate(_to_tuple(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(value):
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def architecture(cfg: DTNConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in NON_ARCHITECTURE_KEYS}


def check_architecture(found: DTNConfig | dict, expected: DTNConfig, what: str) -> None:
    """Refuse weights of another architecture, naming the settings that differ."""
    found = found if isinstance(found, DTNConfig) else DTNConfig.from_dict(found)
    a, b = architecture(found), architecture(expected)
    diff = {k: (a[k], b[k]) for k in a if _norm(a[k]) != _norm(b[k])}
    if diff:
        details = ", ".join(f"{k}: {x!r} there vs {y!r} here" for k, (x, y) in diff.items())
        raise ModelError(f"{what} is of another architecture ({details}); it cannot be used for this model")


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def load_state(path: str | os.PathLike) -> dict:
    """A training state file, loaded weights-only; a damaged or foreign file raises ModelError."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise ModelError(f"no training state to resume: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ModelError(f"{path}: not a readable training state (damaged or truncated?): {err}") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "model" not in state:
        raise ModelError(f"{path}: not a DTNRegistration training state")
    return state


__all__ = ["check_architecture", "load_state", "rng_state", "set_rng_state"]
