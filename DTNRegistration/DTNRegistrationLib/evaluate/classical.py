"""The classical peers of ``dtnreg evaluate`` and the benchmarks: ANTs SyN (antspyx) and PICSL greedy.

Each returns the whole fixed-to-moving map as one ITK displacement field on the fixed grid (LPS mm), so that it is
scored by the same code as every other method (``baselines``). Both are optional extras: ``pip install antspyx``,
``pip install picsl_greedy``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import numpy as np
import SimpleITK as sitk

from ..core.imaging import field_transform
from ..errors import InputError
from .baselines import Method, MethodOutput, PairImages


class SyN(Method):
    """ANTs SyN through antspyx (``ants.registration``), its transforms composed into one displacement field."""

    kind = "syn"

    def __init__(self, spec: str, options: dict[str, str]) -> None:
        try:
            import ants  # noqa: F401
        except ImportError:
            raise InputError(
                f"method {spec!r} needs antspyx: pip install antspyx (or the project's extra: pip install '.[syn]')"
            ) from None
        self.transform = options.get("type", "SyN")
        self.metric = options.get("metric", "mattes")
        iterations = options.get("iterations", "40x20x0")
        try:
            self.iterations = tuple(int(n) for n in iterations.split("x"))
        except ValueError:
            raise InputError(f"method {spec!r}: iterations must look like 40x20x0, got {iterations!r}") from None
        super().__init__(spec, options)

    def default_label(self, options: dict[str, str]) -> str:
        return "SyN" if options.get("type", "SyN") == "SyN" else f"ANTs {options['type']}"

    def cache_identity(self) -> dict:
        import ants

        return {**super().cache_identity(), "antspyx": getattr(ants, "__version__", "?")}

    def run(self, pair: PairImages, alpha: float | None = None) -> MethodOutput:
        import ants

        with tempfile.TemporaryDirectory(prefix="dtnreg-syn-") as tmp:
            fixed, moving = to_ants(pair.fixed), to_ants(pair.moving)
            reg = ants.registration(
                fixed,
                moving,
                type_of_transform=self.transform,
                syn_metric=self.metric,
                reg_iterations=self.iterations,
                outprefix=os.path.join(tmp, "syn_"),
            )
            composed = ants.apply_transforms(
                fixed, moving, reg["fwdtransforms"], compose=os.path.join(tmp, "composed_")
            )
            displacement = sitk.Cast(sitk.ReadImage(composed), sitk.sitkVectorFloat64)
            warped_labels = None
            if pair.moving_labels is not None:
                labels = ants.apply_transforms(
                    fixed, to_ants(pair.moving_labels), reg["fwdtransforms"], interpolator="nearestNeighbor"
                )
                warped_labels = from_ants(labels, pair.fixed, sitk.sitkInt32)
        warped = sitk.Resample(
            pair.moving, pair.fixed, field_transform(displacement), sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
        return MethodOutput(displacement, warped, warped_labels, info={"type": self.transform})


def to_ants(image: sitk.Image):
    """A SimpleITK image as an ANTsImage with the same physical geometry (both are ITK, LPS)."""
    import ants

    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    array = array.astype(np.float32)
    direction = np.reshape(image.GetDirection(), (3, 3))
    return ants.from_numpy(array, origin=image.GetOrigin(), spacing=image.GetSpacing(), direction=direction)


def from_ants(image, reference: sitk.Image, pixel_type: int) -> sitk.Image:
    """An ANTsImage on ``reference``'s grid back as a SimpleITK image of ``pixel_type``."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(image.numpy().transpose(2, 1, 0)))
    out.CopyInformation(reference)
    return sitk.Cast(out, pixel_type)


class Greedy(Method):
    """PICSL greedy (the engine of ITK-SNAP's registration) through its Python wrapper, the standard recipe:
    affine by normalised mutual information from a centre-of-mass (first moments) start, then deformable NCC with
    a 2x2x2 radius, 100x50x10 iterations on the full grid; both composed into one warp by greedy itself (``-rc``)."""

    kind = "greedy"

    def __init__(self, spec: str, options: dict[str, str]) -> None:
        try:
            import picsl_greedy  # noqa: F401
        except ImportError:
            raise InputError(f"method {spec!r} needs PICSL greedy: pip install picsl_greedy") from None
        self.iterations = options.get("iterations", "100x50x10")
        self.metric = options.get("metric", "NCC 2x2x2")
        self.threads = options.get("threads")
        if not all(part.isdigit() for part in self.iterations.split("x")):
            raise InputError(f"method {spec!r}: iterations must look like 100x50x10, got {self.iterations!r}")
        super().__init__(spec, options)

    def default_label(self, options: dict[str, str]) -> str:
        return "greedy"

    def cache_identity(self) -> dict:
        from importlib.metadata import version

        return {**super().cache_identity(), "picsl_greedy": version("picsl_greedy")}

    def run(self, pair: PairImages, alpha: float | None = None) -> MethodOutput:
        from picsl_greedy import Greedy3D

        with tempfile.TemporaryDirectory(prefix="dtnreg-greedy-") as tmp:
            path = {name: os.path.join(tmp, f"{name}.nii.gz") for name in ("fixed", "moving", "warp", "composed")}
            path.update(moments=os.path.join(tmp, "moments.mat"), affine=os.path.join(tmp, "affine.mat"))
            sitk.WriteImage(sitk.Cast(pair.fixed, sitk.sitkFloat32), path["fixed"])
            sitk.WriteImage(sitk.Cast(pair.moving, sitk.sitkFloat32), path["moving"])
            common = f"-d 3 -seed 1{'' if self.threads is None else f' -threads {self.threads}'}"
            pair_args = f"-i {path['fixed']} {path['moving']}"
            greedy = Greedy3D()
            with open(os.devnull, "w") as quiet, _stdout_silenced():  # greedy's optimiser prints from C
                greedy.execute(f"{common} {pair_args} -moments 1 -o {path['moments']}", out=quiet)
                greedy.execute(
                    f"{common} -a -dof 12 {pair_args} -ia {path['moments']} -m NMI -n {self.iterations} "
                    f"-o {path['affine']}",
                    out=quiet,
                )
                greedy.execute(
                    f"{common} {pair_args} -it {path['affine']} -m {self.metric} -n {self.iterations} "
                    f"-o {path['warp']}",
                    out=quiet,
                )
                reslice = f"{common} -rf {path['fixed']} -r {path['warp']} {path['affine']} -rc {path['composed']}"
                greedy.execute(reslice, out=quiet)
            displacement = sitk.Cast(sitk.ReadImage(path["composed"]), sitk.sitkVectorFloat64)
        transform = field_transform(displacement)
        warped = sitk.Resample(pair.moving, pair.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        warped_labels = None
        if pair.moving_labels is not None:
            warped_labels = sitk.Resample(
                pair.moving_labels, pair.fixed, transform, sitk.sitkNearestNeighbor, 0, pair.moving_labels.GetPixelID()
            )
        return MethodOutput(displacement, warped, warped_labels, info={"metric": self.metric})


@contextlib.contextmanager
def _stdout_silenced():
    """Send file descriptor 1 to /dev/null for the block (output printed by C code bypasses sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


__all__ = ["Greedy", "SyN", "from_ants", "to_ants"]
