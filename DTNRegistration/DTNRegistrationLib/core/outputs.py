"""Writing a registration's files all-or-nothing: into a hidden staging folder, then renamed into place."""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import InputError
from . import dicom
from .result import LABELS_NAME, REPORT_NAME, RegistrationResult

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
COMPRESSION_LEVEL = 1
# Float maps (displacement, Jacobian) barely compress (12 % and 20 % smaller at 1 mm) for 9 s and 2.6 s of
# writing, and reading the compressed field back took 3.4 s (docs/benchmarks.md): they are written uncompressed,
# and a .nii.gz one as a gzip stream of stored blocks (still a valid .nii.gz, written and read at disk speed).
UNCOMPRESSED = ("displacement", "inverse_displacement", "jacobian")


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
        # report.json last: once it is in place every other file is too (batch resume relies on this)
        for item in sorted(self.stage.iterdir(), key=lambda p: (p.name == "report.json", p.name)):
            target = self.output_dir / item.name
            os.replace(item, target)
            written.append(target)
        self.stage.rmdir()
        return written

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def write_result(
    result: RegistrationResult,
    stage: StagedOutput,
    extension: str = ".nii.gz",
    inputs: dict | None = None,
    provenance: dict | None = None,
    which: tuple[str, ...] | None = None,
) -> None:
    """Write the images of ``result`` (those named in ``which``, default all; ``inverse`` names the inverse
    displacement; warped labels whenever present) and ``report.json`` into the staging folder.

    ``provenance`` (e.g. ``input_files`` fingerprints and the requested ``options``) is stored in the report as
    given, with the list of files written (``outputs``): what `dtnreg batch` checks before skipping a pair.
    """
    images = {
        "warped": result.warped,
        "displacement": result.displacement,
        "inverse_displacement": result.inverse_displacement,
        "jacobian": result.jacobian,
        "folding": result.folding,
        LABELS_NAME: result.warped_labels,
    }
    wanted = None if which is None else {("inverse_displacement" if n == "inverse" else n) for n in which}
    images = {
        name: image
        for name, image in images.items()
        if image is not None and (wanted is None or name in wanted or name == LABELS_NAME)
    }

    def write(name: str) -> None:
        image = images[name]
        if image.GetPixelID() == sitk.sitkVectorFloat64:  # fields as float32: half the bytes, 1e-7 relative error
            image = sitk.Cast(image, sitk.sitkVectorFloat32)
        path = stage.path(name + extension)
        if name not in UNCOMPRESSED:
            sitk.WriteImage(image, str(path), True, COMPRESSION_LEVEL)
        elif extension == ".nii.gz":
            write_stored_gzip(image, path)
        else:
            sitk.WriteImage(image, str(path), False)

    # two writers: compression is single-threaded and releases the GIL (1.3 s saved at 1 mm on 2 cores);
    # leaving the block waits for every writer, so a failure never races the staging folder's removal
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(write, images))
    content = {**report(result, inputs), **(provenance or {}), "outputs": [name + extension for name in images]}
    stage.path(REPORT_NAME).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def write_stored_gzip(image: sitk.Image, path: Path) -> None:
    """Write ``image`` as a .nii.gz whose gzip stream holds stored (uncompressed) blocks."""
    plain = path.with_name(path.name[: -len(".gz")])
    sitk.WriteImage(image, str(plain), False)
    try:
        with open(plain, "rb") as source, gzip.open(path, "wb", compresslevel=0) as target:
            shutil.copyfileobj(source, target, 16 * 2**20)
    finally:
        plain.unlink(missing_ok=True)


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


def file_fingerprint(path: str | os.PathLike | None) -> dict | None:
    """Resolved path, size and modification time of an input: enough to notice it was replaced or edited. A DICOM
    series (a folder, or ``FOLDER/<series UID>``) counts every file of its folder: sizes summed, the latest time."""
    if path is None:
        return None
    path = Path(path).resolve()
    series = dicom.series_location(path)
    stats = [f.stat() for f in sorted(series[0].iterdir()) if f.is_file()] if series else [path.stat()]
    return {
        "path": str(path),
        "bytes": sum(stat.st_size for stat in stats),
        "mtime_ns": max((stat.st_mtime_ns for stat in stats), default=0),
    }


def versions() -> dict:
    import torch  # here, not at the top: the command line imports this module while torch loads in a thread

    return {
        "dtnregistration": __version__,
        "torch": torch.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
