"""A registration's result, and reading one back from the files ``dtnreg register`` writes (no torch needed).

The Slicer module runs the engine in a child process and rebuilds the result from its output folder on the main
thread, so this module imports only SimpleITK and the standard library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from ..errors import RegistrationFailed

# The images of a result, by file stem; ``warped_labels`` only where labels were given, ``inverse_displacement``
# only where it was asked for.
IMAGE_NAMES = ("warped", "displacement", "inverse_displacement", "jacobian", "folding")
LABELS_NAME = "warped_labels"
OPTIONAL_NAMES = ("inverse_displacement", LABELS_NAME)
REPORT_NAME = "report.json"


@dataclass
class RegistrationResult:
    warped: sitk.Image
    displacement: sitk.Image
    inverse_displacement: sitk.Image | None  # None unless asked for (``register(..., inverse=True)``)
    jacobian: sitk.Image
    folding: sitk.Image
    warped_labels: sitk.Image | None
    metrics: dict
    timings: dict
    device: str
    model: dict
    alpha: float
    affine: sitk.AffineTransform | None = field(default=None, repr=False)


def read_result(folder: str | os.PathLike, extension: str = ".nrrd") -> RegistrationResult:
    """The result that ``dtnreg register --format EXTENSION`` wrote into ``folder``.

    Displacement fields come back as float64 vectors, as the engine makes them. A missing or unreadable file
    raises :class:`RegistrationFailed` naming it.
    """
    folder = Path(folder)
    report_path = folder / REPORT_NAME
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RegistrationFailed(f"the registration wrote no readable report ({report_path}: {err})") from None

    def read(name: str, pixel=sitk.sitkUnknown) -> sitk.Image:
        path = folder / (name + extension)
        try:
            return sitk.ReadImage(str(path), pixel)
        except RuntimeError as err:
            raise RegistrationFailed(f"cannot read the result file {path.name}: {str(err).strip()[-200:]}") from None

    def present(name: str) -> bool:
        return name not in OPTIONAL_NAMES or (folder / (name + extension)).is_file()

    images = {name: None for name in (*IMAGE_NAMES, LABELS_NAME)}
    for name in filter(present, images):
        vector = name in ("displacement", "inverse_displacement")
        images[name] = read(name, sitk.sitkVectorFloat64) if vector else read(name)
    return RegistrationResult(
        metrics=report.get("metrics", {}),
        timings=report.get("timings_s", {}),
        device=str(report.get("device", "")),
        model=report.get("model", {}),
        alpha=float(report.get("alpha", 0.0)),
        affine=affine_from_report(report.get("affine")),
        **images,
    )


def affine_from_report(entry: dict | None) -> sitk.AffineTransform | None:
    """The affine initialisation as ``report.json`` records it (ITK, fixed-to-moving, LPS mm)."""
    if not entry:
        return None
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in entry["matrix"]])
    affine.SetTranslation([float(v) for v in entry["translation"]])
    affine.SetCenter([float(v) for v in entry["center"]])
    return affine


__all__ = ["IMAGE_NAMES", "LABELS_NAME", "REPORT_NAME", "RegistrationResult", "affine_from_report", "read_result"]
