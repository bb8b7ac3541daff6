"""Where images are: a folder of images, or a Learn2Reg/OASIS-style dataset JSON (paths only; nothing is read).

Shared by training (``train.volumes``) and evaluation (``evaluate.inputs``), so that neither imports the other.
No torch, no SimpleITK. A problem raises ``DataError`` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .files import IMAGE_SUFFIXES, image_stem

log = logging.getLogger(__name__)

LABEL_NAME_TOKENS = {"mask", "brainmask", "label", "labels", "seg", "aseg", "dseg", "parc", "kmeans"}


@dataclass
class Subject:
    """One training image with its optional label map and mask (paths)."""

    image: Path
    label: Path | None = None
    mask: Path | None = None

    @property
    def name(self) -> str:
        return image_stem(self.image)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _looks_like_labels(path: Path) -> bool:
    """File names such as ``*_brainmask``, ``*_seg``, ``*_labels`` in an image folder are not training images."""
    tokens = set(re.split(r"[_.\-]+", path.name.lower()))
    return bool(tokens & LABEL_NAME_TOKENS)


def subjects_from_folder(folder: str | os.PathLike, pattern: str = "*", labels_dir: str | None = None) -> list[Subject]:
    """Images in ``folder`` matching ``pattern`` (label-like names skipped, e.g. ``*_mask``), sorted by name.

    With ``labels_dir``, a file of the same name there is the image's label map.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"images folder {folder}: not found or not a folder")
    candidates = sorted(p for p in folder.glob(pattern) if _is_image_file(p))
    images = [p for p in candidates if not _looks_like_labels(p)]
    skipped = [p.name for p in candidates if _looks_like_labels(p)]
    if skipped:
        log.info("skipped %d label-like files in %s: %s", len(skipped), folder, ", ".join(skipped))
    if not images:
        raise DataError(
            f"images folder {folder}: no images matching {pattern!r} (suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    subjects = []
    for path in images:
        label = None
        if labels_dir is not None:
            label = Path(labels_dir) / path.name
            if not label.is_file():
                raise DataError(f"image {path}: no label map {label}")
        subjects.append(Subject(path, label))
    return subjects


def _json_path(base: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected a file path, got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else (base / path).resolve()


def _json_subjects(entries, base: Path, where: str) -> list[Subject]:
    if not isinstance(entries, list):
        raise DataError(f"{where}: expected a list of {{'image', 'label'}} entries")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{where}[{i}]: expected an object with an 'image' path, got {entry!r}")
        label = _json_path(base, entry["label"], f"{where}[{i}].label") if entry.get("label") else None
        mask = _json_path(base, entry["mask"], f"{where}[{i}].mask") if entry.get("mask") else None
        out.append(Subject(_json_path(base, entry["image"], f"{where}[{i}].image"), label, mask))
    return out


def _json_pairs(entries, base: Path, where: str) -> list[tuple[Path, Path]]:
    if not isinstance(entries, list):
        raise DataError(f"{where}: expected a list of {{'moving', 'fixed'}} pairs")
    pairs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "moving" not in entry or "fixed" not in entry:
            raise DataError(f"{where}[{i}]: expected an object with 'moving' and 'fixed' paths, got {entry!r}")
        pairs.append(
            (_json_path(base, entry["moving"], f"{where}[{i}]"), _json_path(base, entry["fixed"], f"{where}[{i}]"))
        )
    return pairs


@dataclass
class JsonDataset:
    """The subjects and pairs a Learn2Reg-style dataset JSON lists (paths resolved against the JSON)."""

    training: list[Subject]
    validation: list[Subject]
    training_pairs: list[tuple[Path, Path]]
    validation_pairs: list[tuple[Path, Path]]


def read_dataset_json(path: str | os.PathLike) -> JsonDataset:
    """Parse a dataset JSON: ``training`` (required), ``validation``, and the pair lists
    ``training_paired_images`` and ``registration_val`` (Learn2Reg), each ``{"moving", "fixed"}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset JSON {path}: file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"dataset JSON {path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not doc.get("training"):
        raise DataError(f"dataset JSON {path}: no 'training' list of images")
    base = path.parent.resolve()
    dataset = JsonDataset(
        training=_json_subjects(doc["training"], base, f"{path.name}: training"),
        validation=_json_subjects(doc.get("validation") or [], base, f"{path.name}: validation"),
        training_pairs=_json_pairs(doc.get("training_paired_images") or [], base, f"{path.name}: training pairs"),
        validation_pairs=_json_pairs(doc.get("registration_val") or [], base, f"{path.name}: registration_val"),
    )
    _check_files_exist(dataset, path)
    return dataset


def _check_files_exist(dataset: JsonDataset, where: Path) -> None:
    """Every file the JSON names must exist: list all the missing ones at once."""
    paths = []
    for subject in dataset.training + dataset.validation:
        paths += [p for p in (subject.image, subject.label, subject.mask) if p is not None]
    for moving, fixed in dataset.training_pairs + dataset.validation_pairs:
        paths += [moving, fixed]
    missing = sorted({str(p) for p in paths if not p.is_file()})
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DataError(f"dataset JSON {where}: {len(missing)} listed file(s) not found:\n  {shown}")


__all__ = ["JsonDataset", "Subject", "read_dataset_json", "subjects_from_folder"]
