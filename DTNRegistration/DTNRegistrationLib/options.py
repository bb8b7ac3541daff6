"""Registration choices every face offers (command line, Slicer panel, evaluation), defined once and torch-free."""

from __future__ import annotations

# Refinement presets (their schedules: refinement.PRESETS). fast: coarse to fine at 4 and 2 mm, the default;
# accurate: a further level on a 1 mm grid.
PRESET_NAMES = ("fast", "accurate")
DEFAULT_PRESET = "fast"

__all__ = ["DEFAULT_PRESET", "PRESET_NAMES"]
