"""The options of one registration, typed and checked once, with their defaults (torch-free).

Every face builds a :class:`RegistrationOptions`: the command line from its arguments, the Slicer logic from the
panel's parameter node, ``dtnreg batch`` and ``dtnreg evaluate`` from theirs; ``register()`` builds one from its
keywords. Its ``__post_init__`` is the only place where alpha, the preset, the refinement steps, the similarity,
the device and the outputs are validated, and this module is the only place where their defaults are defined.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field

from .errors import InputError

# The smoothness weight alpha: the default of a model trained without one, and the range alpha-conditioned models
# are trained on (the Slicer panel's slider).
DEFAULT_ALPHA = 0.1
ALPHA_RANGE = (0.01, 1.0)
# Refinement presets (their schedules: core.refinement.PRESETS). fast: coarse to fine at 4 and 2 mm, the default;
# accurate: a further level on a 1 mm grid; longitudinal: the same subject scanned again, aligned rigidly (an
# affine's scaling would take up a real change of volume), deforming only where the images differ.
PRESET_NAMES = ("fast", "accurate", "longitudinal")
DEFAULT_PRESET = "fast"
RIGID_PRESETS = ("longitudinal",)
# Refinement similarities (core.losses.SIMILARITIES and auto). auto: local NCC when both images have one contrast,
# normalised gradient fields when their intensities at corresponding points clearly disagree (core/modality.py).
# The similarity terms themselves (core.losses.SIMILARITIES; training chooses among these), named here without torch.
SIMILARITY_TERMS = ("ncc", "ngf", "mind", "l1", "mse")
SIMILARITY_NAMES = ("auto", *SIMILARITY_TERMS)
DEFAULT_SIMILARITY = "auto"
# Devices: auto picks CUDA when torch sees a GPU; "cuda:N" names one GPU.
DEVICE_NAMES = ("auto", "cuda", "cpu")
# Files a registration can write besides report.json; the inverse is computed only when asked for.
OUTPUT_NAMES = ("warped", "displacement", "inverse", "jacobian", "folding")
DEFAULT_OUTPUTS = ("warped", "displacement", "jacobian", "folding")


def check_device(device: str | None) -> str:
    """``device`` if it names one torch can be asked for (auto, cpu, cuda or cuda:N), else ``InputError``."""
    name = "auto" if device is None else str(device)
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N (N: the GPU's index)")
    return name


def device_argument(text: str) -> str:
    """``check_device`` for argparse (``--device``): the same names, the error as a usage error (exit 2)."""
    try:
        return check_device(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


@dataclass(frozen=True)
class RegistrationOptions:
    """What a registration is asked to do, besides its images.

    alpha: smoothness weight (None: the model's own); device: auto, cpu, cuda[:N]; model: shipped name or weights
    path (None: the registry's default); preset: refinement schedule (None: ``DEFAULT_PRESET``, recorded as not
    asked for); refine: N steps on the work grid instead of the preset (0: the network alone); refine_similarity:
    one of ``SIMILARITY_NAMES``; affine: affine initialisation first; outputs: files to write.
    """

    alpha: float | None = None
    device: str = "auto"
    model: str | None = None
    preset: str | None = None
    refine: int | None = None
    refine_similarity: str = DEFAULT_SIMILARITY
    affine: bool = True
    outputs: tuple[str, ...] = field(default=DEFAULT_OUTPUTS)

    def __post_init__(self) -> None:
        # frozen: normalised values are set through object.__setattr__, once, here
        if self.alpha is not None:
            alpha = float(self.alpha)
            if not (math.isfinite(alpha) and alpha > 0):
                raise InputError(f"alpha must be a positive number, got {alpha}")
            object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "device", check_device(self.device))
        object.__setattr__(self, "model", str(self.model) if self.model else None)
        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise InputError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESET_NAMES)}")
        if self.refine is not None:
            if int(self.refine) < 0:
                raise InputError(f"refine steps must be >= 0, got {self.refine}")
            object.__setattr__(self, "refine", int(self.refine))
        similarity = self.refine_similarity or DEFAULT_SIMILARITY
        if similarity not in SIMILARITY_NAMES:
            choices = sorted(SIMILARITY_NAMES)
            raise InputError(f"unknown refinement similarity {similarity!r}; choose one of {choices}")
        object.__setattr__(self, "refine_similarity", similarity)
        object.__setattr__(self, "affine", bool(self.affine))
        outputs = tuple(self.outputs)
        unknown = sorted(set(outputs) - set(OUTPUT_NAMES))
        if unknown or not outputs:
            raise InputError(f"unknown output(s) {unknown}; choose from {','.join(OUTPUT_NAMES)}")
        object.__setattr__(self, "outputs", outputs)

    @property
    def rigid(self) -> bool:
        """Whether the initial alignment is rigid instead of affine (the preset's choice, also with ``refine``)."""
        return self.preset in RIGID_PRESETS

    @property
    def preset_name(self) -> str:
        """The preset that runs when no step count is given."""
        return self.preset or DEFAULT_PRESET

    def register_keywords(self) -> dict:
        """The keywords of ``core.registration.register`` that these options set (the model is loaded by the
        caller; whether to compute the inverse is the caller's choice: the command line asks for it with
        ``"inverse" in outputs``)."""
        return {
            "alpha": self.alpha,
            "device": self.device,
            "refine": self.refine,
            "preset": self.preset,
            "refine_similarity": self.refine_similarity,
            "affine": self.affine,
        }

    def provenance(self) -> dict:
        """What ``report.json`` records as asked for; ``dtnreg batch`` redoes a pair whose record differs.

        The device and the model are left out (the model is checked by its SHA-256, and a pair is not redone on
        another device).
        """
        return {
            "alpha": self.alpha,
            "refine": self.refine,
            "preset": self.preset,
            "refine_similarity": self.refine_similarity,
            "outputs": sorted(self.outputs),
            "affine": self.affine,
        }

    def arguments(self) -> list[str]:
        """The ``dtnreg register`` arguments that ask for these options, defaults left out (and the model: where a
        relative path points depends on the caller's working directory)."""
        args = []
        if self.alpha is not None:
            args += ["--alpha", repr(self.alpha)]
        args += ["--device", self.device]
        if self.refine is not None:
            args += ["--refine", str(self.refine)]
        if self.preset and (self.refine is None or self.rigid):  # --refine replaces the schedule, not the alignment
            args += ["--preset", self.preset]
        if self.refine_similarity != DEFAULT_SIMILARITY:
            args += ["--refine-similarity", self.refine_similarity]
        if not self.affine:
            args.append("--no-affine")
        if self.outputs != DEFAULT_OUTPUTS:
            args += ["--outputs", ",".join(self.outputs)]
        return args


__all__ = [
    "ALPHA_RANGE",
    "DEFAULT_ALPHA",
    "DEFAULT_OUTPUTS",
    "DEFAULT_PRESET",
    "DEFAULT_SIMILARITY",
    "DEVICE_NAMES",
    "OUTPUT_NAMES",
    "PRESET_NAMES",
    "SIMILARITY_NAMES",
    "SIMILARITY_TERMS",
    "RegistrationOptions",
    "check_device",
    "device_argument",
]
