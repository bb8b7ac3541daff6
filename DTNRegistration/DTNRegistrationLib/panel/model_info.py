"""What the Slicer panel shows about a model, read from the registry and the weights' header (no torch).

``describe(models_dir, model)`` takes a shipped model's name, a weights file's path, or "" for the registry's
default, and never raises: a model that cannot be read comes back with ``problem`` set.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..core import model_registry
from ..errors import ModelError
from ..options import ALPHA_RANGE, DEFAULT_ALPHA


@dataclass
class ModelInfo:
    name: str = ""
    shipped: bool = False
    problem: str = ""  # empty when the model can be used
    alpha: float = DEFAULT_ALPHA  # its default smoothness weight
    alpha_range: tuple[float, float] = ALPHA_RANGE  # the alphas it was trained for
    alpha_conditioned: bool = True  # one network for a range of alphas
    variant: str = "dtn"
    spacing_mm: float = 2.0
    sha256: str = ""

    def description(self) -> str:
        """One line for the panel: what the model is, or why it cannot be used."""
        if self.problem:
            return self.problem
        low, high = self.alpha_range
        trained = f"any alpha in {low:g}-{high:g}" if self.alpha_conditioned else f"trained at alpha {self.alpha:g}"
        sha = f", sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"{self.name}: {self.variant.upper()}, {trained}, {self.spacing_mm:g} mm grid{sha}"

    def clamped_alpha(self, limits: tuple[float, float] = ALPHA_RANGE) -> float:
        """The default alpha kept inside ``limits`` (the panel's slider)."""
        return min(max(self.alpha, limits[0]), limits[1])


def _registry(models_dir: str | os.PathLike) -> dict:
    try:
        return model_registry.registry(models_dir)
    except ModelError:  # the panel describes what it can; loading the model reports the problem
        return {"default": None, "models": {}}


def shipped_names(models_dir: str | os.PathLike = model_registry.MODELS_DIR) -> list[str]:
    return sorted(_registry(models_dir).get("models", {}))


def describe(models_dir: str | os.PathLike = model_registry.MODELS_DIR, model: str = "") -> ModelInfo:
    registry = _registry(models_dir)
    name = model or registry.get("default") or ""
    if not name:
        return ModelInfo(problem="No shipped model is registered; choose a weights file (.safetensors).")
    entry = registry.get("models", {}).get(name)
    path = Path(models_dir) / entry["file"] if entry else Path(name)
    info = ModelInfo(name=name if entry else path.name, shipped=entry is not None)
    if entry:
        info.sha256 = str(entry.get("sha256", ""))
    if not path.is_file():
        shipped = ", ".join(shipped_names(models_dir)) or "none"
        info.problem = f"Model '{name}' not found (shipped: {shipped})."
        return info
    try:
        config, extra = model_registry.weights_config(path)
    except (OSError, ValueError, struct.error) as err:
        info.problem = f"Cannot read {path}: {err}"
        return info
    info.alpha = float(config.get("alpha", DEFAULT_ALPHA))
    info.alpha_conditioned = bool(config.get("alpha_conditioned", True))
    if info.alpha_conditioned:
        low, high = (float(a) for a in config.get("alpha_range", ALPHA_RANGE))
        info.alpha_range = (low, high)
    else:
        info.alpha_range = (info.alpha, info.alpha)
    info.variant = str(config.get("variant", "dtn"))
    info.spacing_mm = float(extra.get("spacing_mm", 2.0))
    return info


__all__ = ["ALPHA_RANGE", "DEFAULT_ALPHA", "ModelInfo", "describe", "shipped_names"]
