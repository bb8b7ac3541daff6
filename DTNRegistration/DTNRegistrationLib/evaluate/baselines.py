"""The methods ``dtnreg evaluate`` compares, behind one interface: identity, affine, DTN-family models, ANTs SyN.

Every method maps a pair onto the fixed image's grid and hands back the whole fixed-to-moving map as one ITK
displacement field (LPS mm, the engine's convention), so that all methods are scored by the same code: Dice and
HD95 on the warped labels, folding and SDlogJ on the Jacobian of that field.

Method specs (``--methods``): ``identity``, ``affine``, ``syn[:type=SyN][:iterations=40x20x0][:metric=mattes]``,
``greedy[:iterations=100x50x10][:metric=NCC 2x2x2][:threads=N]`` (PICSL greedy, ``pip install picsl_greedy``),
``dtn:MODEL[:refine=N|:preset=fast|accurate][:alpha=A][:affine=0]`` where MODEL is a shipped model name,
``default``, or a ``.safetensors`` path; any spec takes ``name=LABEL`` to set its label in tables.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..options import RegistrationOptions

VARIANT_NAMES = {"dtn": "DTN", "dtn_s": "DTN_s", "dtn_c": "DTN_c", "none": "transformer-free"}


ENGINE_DIR = Path(__file__).resolve().parents[1] / "core"


@functools.lru_cache(maxsize=4)
def engine_digest(folder: Path = ENGINE_DIR) -> str:
    """SHA-1 of the engine's source (``core/``): what a DTN method's result depends on besides its weights."""
    sha = hashlib.sha1()
    for path in sorted(Path(folder).glob("*.py")):
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()


@dataclass
class PairImages:
    """One pair read into memory; labels and mask are optional."""

    name: str
    moving: sitk.Image
    fixed: sitk.Image
    moving_labels: sitk.Image | None = None
    fixed_labels: sitk.Image | None = None
    mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None


@dataclass
class MethodOutput:
    """What a method produced on the fixed grid; ``jacobian`` is filled when the method already computed it."""

    displacement: sitk.Image
    warped: sitk.Image
    warped_labels: sitk.Image | None
    jacobian: np.ndarray | None = None
    info: dict = field(default_factory=dict)


class Method:
    """A registration method; ``cache_identity`` lists everything its results depend on."""

    kind = ""

    def __init__(self, spec: str, options: dict[str, str]) -> None:
        self.spec = spec
        self.label = options.pop("name", None) or self.default_label(options)
        self.options = options

    def default_label(self, options: dict[str, str]) -> str:
        return self.kind

    def cache_identity(self) -> dict:
        return {"kind": self.kind, "options": dict(sorted(self.options.items()))}

    def run(self, pair: PairImages, alpha: float | None = None) -> MethodOutput:
        raise NotImplementedError


class Identity(Method):
    """No registration: the moving image resampled in physical space (the lower bound)."""

    kind = "identity"

    def run(self, pair: PairImages, alpha: float | None = None) -> MethodOutput:
        return outputs_from_transform(pair, sitk.Transform(3, sitk.sitkIdentity))


class Affine(Method):
    """The engine's affine initialisation alone (mutual information, rigid then affine)."""

    kind = "affine"

    def run(self, pair: PairImages, alpha: float | None = None) -> MethodOutput:
        from ..core.imaging import affine_initialisation

        return outputs_from_transform(pair, affine_initialisation(pair.moving, pair.fixed, pair.mask))


class DTNMethod(Method):
    """A model of the DTN family through ``registration.register`` (affine first, optional refinement)."""

    kind = "dtn"

    def __init__(self, spec: str, options: dict[str, str], model: str, device: str = "auto") -> None:
        from ..core.models import load_model

        self.loaded = load_model(None if model in ("", "default") else model)
        preset = options.pop("preset", None)
        if preset is not None and "refine" in options:
            raise InputError(f"method {spec!r}: give refine=N or preset=NAME, not both")
        try:
            self.registration_options = RegistrationOptions(
                alpha=_float_option(options, "alpha", spec),
                device=device,
                preset=preset,
                refine=None if preset else _int_option(options, "refine", spec, 0),
                affine=_bool_option(options, "affine", spec, True),
            )
        except InputError as err:
            raise InputError(f"method {spec!r}: {err}") from None
        super().__init__(spec, options)

    # the options as the label and the cache key name them
    device = property(lambda self: self.registration_options.device)
    preset = property(lambda self: self.registration_options.preset)
    refine = property(lambda self: self.registration_options.refine)
    alpha = property(lambda self: self.registration_options.alpha)
    affine = property(lambda self: self.registration_options.affine)

    @property
    def variant(self) -> str:
        return self.loaded.config.variant

    @property
    def alpha_conditioned(self) -> bool:
        return bool(self.loaded.config.alpha_conditioned)

    def default_label(self, options: dict[str, str]) -> str:
        label = f"{VARIANT_NAMES.get(self.variant, self.variant)} ({self.loaded.name})"
        if self.preset:
            label += f" {self.preset}"
        elif self.refine:
            label += f" +refine {self.refine}"
        if self.alpha is not None:
            label += f" alpha={self.alpha:g}"
        return label if self.affine else label + " no-affine"

    def cache_identity(self) -> dict:
        extra = {"sha256": self.loaded.sha256, "refine": self.refine, "alpha": self.alpha, "affine": self.affine}
        extra["engine"] = engine_digest()  # a changed engine is a new method too
        if self.preset:
            from ..core.refinement import PRESETS

            extra["preset"] = [self.preset, repr(PRESETS[self.preset])]  # a changed schedule is a new method
        return {**super().cache_identity(), **extra}

    def run(self, pair: PairImages, alpha: float | None = None) -> MethodOutput:
        from ..core.registration import register

        options = self.registration_options if alpha is None else replace(self.registration_options, alpha=alpha)
        result = register(
            pair.moving,
            pair.fixed,
            moving_labels=pair.moving_labels,
            mask=pair.mask,
            moving_mask=pair.moving_mask,
            model=self.loaded,
            **options.register_keywords(),
        )
        info = {"alpha": result.alpha, "device": result.device, "model": result.model, "timings_s": result.timings}
        jacobian = sitk.GetArrayFromImage(result.jacobian)
        return MethodOutput(result.displacement, result.warped, result.warped_labels, jacobian, info)


def outputs_from_transform(pair: PairImages, transform: sitk.Transform) -> MethodOutput:
    """Warped image, labels and the equivalent displacement field of a fixed-to-moving transform."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(pair.fixed)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    displacement = to_field.Execute(transform)
    warped = sitk.Resample(pair.moving, pair.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_labels = None
    if pair.moving_labels is not None:
        warped_labels = sitk.Resample(
            pair.moving_labels, pair.fixed, transform, sitk.sitkNearestNeighbor, 0, pair.moving_labels.GetPixelID()
        )
    return MethodOutput(displacement, warped, warped_labels)


def parse_method(spec: str, device: str = "auto") -> Method:
    """A method from its spec (see the module docstring); bad specs and models fail here, before any work."""
    parts = [p for p in spec.strip().split(":")]
    head = parts[0].lower()
    if head == "dtn":
        if len(parts) < 2 or "=" in parts[1]:
            raise InputError(f"method {spec!r}: give a model, e.g. dtn:default or dtn:/path/weights.safetensors")
        return _checked(DTNMethod(spec, _options(parts[2:], spec), parts[1], device), set())
    options = _options(parts[1:], spec)
    if head == "identity":
        return _checked(Identity(spec, options), set())
    if head == "affine":
        return _checked(Affine(spec, options), set())
    if head == "syn":
        from .classical import SyN

        return _checked(SyN(spec, options), {"type", "metric", "iterations"})
    if head == "greedy":
        from .classical import Greedy

        return _checked(Greedy(spec, options), {"iterations", "metric", "threads"})
    raise InputError(f"unknown method {spec!r}; use identity, affine, syn, greedy or dtn:MODEL[:refine=N][:alpha=A]")


def parse_methods(specs: list[str], device: str = "auto") -> list[Method]:
    """All methods, with unique labels (the tables' column names)."""
    methods = [parse_method(s, device) for s in specs]
    labels = [m.label for m in methods]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise InputError(f"methods share the label(s) {duplicates}; add :name=LABEL to tell them apart")
    return methods


def _options(parts: list[str], spec: str) -> dict[str, str]:
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InputError(f"method {spec!r}: option {part!r} is not KEY=VALUE")
        options[key.strip().lower()] = value.strip()
    return options


def _checked(method: Method, allowed: set[str]) -> Method:
    unknown = set(method.options) - allowed
    if unknown:
        raise InputError(f"method {method.spec!r}: unknown option(s) {sorted(unknown)}")
    return method


def _int_option(options: dict, key: str, spec: str, default: int) -> int:
    value = options.pop(key, None)
    try:
        number = default if value is None else int(value)
    except ValueError:
        raise InputError(f"method {spec!r}: {key} must be an integer, got {value!r}") from None
    if number < 0:
        raise InputError(f"method {spec!r}: {key} must be >= 0")
    return number


def _float_option(options: dict, key: str, spec: str) -> float | None:
    value = options.pop(key, None)
    try:
        number = None if value is None else float(value)
    except ValueError:
        raise InputError(f"method {spec!r}: {key} must be a number, got {value!r}") from None
    if number is not None and not number > 0:
        raise InputError(f"method {spec!r}: {key} must be > 0")
    return number


def _bool_option(options: dict, key: str, spec: str, default: bool) -> bool:
    value = options.pop(key, None)
    if value is None:
        return default
    if value.lower() in ("1", "yes", "true", "on"):
        return True
    if value.lower() in ("0", "no", "false", "off"):
        return False
    raise InputError(f"method {spec!r}: {key} must be 0 or 1, got {value!r}")


def method_file_stem(method: Method) -> str:
    """A file-name-safe version of a method's label."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in method.label).strip("_") or method.kind


__all__ = [
    "Affine",
    "DTNMethod",
    "Identity",
    "Method",
    "MethodOutput",
    "PairImages",
    "outputs_from_transform",
    "parse_method",
    "parse_methods",
]
