"""File names and safe writing, shared by every part of the engine (no torch, no SimpleITK)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The module's resources (models, samples, label tables, UI), next to the engine package in the source tree and in
# Slicer's install tree alike.
RESOURCES_DIR = Path(__file__).resolve().parent.parent / "Resources"

# Image files the engine reads (what SimpleITK reads for brain MRI); ``.seg.nrrd`` is a Slicer segmentation.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".seg.nhdr")


def image_stem(path: str | os.PathLike) -> str:
    """A file's name without its image extension, double ones included: ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``,
    ``tissue.seg.nrrd`` -> ``tissue``; other names lose their last suffix only."""
    name = Path(path).name
    for suffix in SEGMENTATION_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["IMAGE_SUFFIXES", "RESOURCES_DIR", "SEGMENTATION_SUFFIXES", "atomic_write", "image_stem"]
