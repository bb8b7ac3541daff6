"""Writing a registration's files all-or-nothing: into a hidden staging folder, then renamed into place."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .imaging import InputError
from .result import IMAGE_NAMES, LABELS_NAME, REPORT_NAME, RegistrationResult

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# zlib level 1: writing a 1 mm displacement field at the default level took longer than the registration
COMPRESSION_LEVEL = 1


def check_extension(extension: str) -> str:
    extension = extension if extension.startswith(".") else "." + extension
    if extension not in EXTENSIONS:
        raise InputError(f"output format {extension!r} is not supported; choose one of {', '.join(EXTENSIONS)}")
    return extension


class StagedOutput:
    """A staging folder inside the output directory; ``commit()`` renames its files into the directory.

    Made before any computation, so an unwritable directory is reported at once; on failure or Ctrl-C
    ``discard()`` removes it and nothing new is left in the output directory.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(prefix=".dtnreg-", dir=self.output_dir))
        except OSError as err:
            raise InputError(f"output directory {self.output_dir}: cannot be written ({err.strerror})") from None

    def path(self, name: str) -> Path:
        return self.stage / name

    def commit(self) -> list[Path]:
        written = []
        for item in sorted(self.stage.iterdir()):
            target = self.output_dir / item.name
            os.replace(item, target)
            written.append(target)
        self.stage.rmdir()
        return written

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def write_result(
    result: RegistrationResult, stage: StagedOutput, extension: str = ".nii.gz", inputs: dict | None = None
) -> None:
    """Write every image of ``result`` and ``report.json`` into the staging folder."""
    images = {name: getattr(result, name) for name in IMAGE_NAMES}
    if result.warped_labels is not None:
        images[LABELS_NAME] = result.warped_labels

    def write(name: str) -> None:
        image = images[name]
        if image.GetPixelID() == sitk.sitkVectorFloat64:  # fields as float32: half the bytes, 1e-7 relative error
            image = sitk.Cast(image, sitk.sitkVectorFloat32)
        sitk.WriteImage(image, str(stage.path(name + extension)), True, COMPRESSION_LEVEL)

    # two writers: compression is single-threaded and releases the GIL (1.3 s saved at 1 mm on 2 cores);
    # leaving the block waits for every writer, so a failure never races the staging folder's removal
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(write, images))
    stage.path(REPORT_NAME).write_text(json.dumps(report(result, inputs), indent=2) + "\n")


def report(result: RegistrationResult, inputs: dict | None = None) -> dict:
    affine = result.affine
    return {
        "inputs": inputs or {},
        "alpha": result.alpha,
        "metrics": result.metrics,
        "timings_s": result.timings,
        "device": result.device,
        "model": result.model,
        "affine": None
        if affine is None
        else {
            "matrix": list(affine.GetMatrix()),
            "translation": list(affine.GetTranslation()),
            "center": list(affine.GetCenter()),
            "convention": "ITK, fixed-to-moving, LPS mm",
        },
        "versions": versions(),
    }


def versions() -> dict:
    return {
        "dtnregistration": __version__,
        "torch": torch.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
