"""Registration choices every face offers (command line, Slicer panel, evaluation), defined once and torch-free."""

from __future__ import annotations

# Refinement presets (their schedules: refinement.PRESETS). fast: coarse to fine at 4 and 2 mm, the default;
# accurate: a further level on a 1 mm grid.
PRESET_NAMES = ("fast", "accurate")
DEFAULT_PRESET = "fast"
# Refinement similarities (losses.SIMILARITIES and auto). auto: local NCC when both images have one contrast,
# normalised gradient fields when their intensities at corresponding points clearly disagree (modality.py).
SIMILARITY_NAMES = ("auto", "ncc", "ngf", "mind", "l1", "mse")
DEFAULT_SIMILARITY = "auto"

__all__ = ["DEFAULT_PRESET", "DEFAULT_SIMILARITY", "PRESET_NAMES", "SIMILARITY_NAMES"]
