"""Pairs to evaluate: from a CSV, a Learn2Reg/OASIS dataset JSON, or an atlas and a folder; all checked up front."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..files import image_stem

ROLES = ("moving", "fixed", "moving_labels", "fixed_labels", "mask", "moving_mask")


@dataclass
class PairSpec:
    """One pair to evaluate (paths); labels and the fixed- and moving-image masks are optional."""

    name: str
    moving: Path
    fixed: Path
    moving_labels: Path | None = None
    fixed_labels: Path | None = None
    mask: Path | None = None
    moving_mask: Path | None = None

    def files(self) -> dict[str, Path]:
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}

    @property
    def labelled(self) -> bool:
        return self.moving_labels is not None and self.fixed_labels is not None


def _unique_names(pairs: list[PairSpec]) -> list[PairSpec]:
    seen: dict[str, int] = {}
    for pair in pairs:
        count = seen.get(pair.name, 0)
        seen[pair.name] = count + 1
        if count:
            pair.name = f"{pair.name}#{count + 1}"
    return pairs


def pairs_from_csv(path: str | Path) -> list[PairSpec]:
    """Pairs from a CSV with columns moving,fixed[,moving_labels,fixed_labels,mask,moving_mask,name] (paths relative
    to it)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file {path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's BOM too
        rows = list(csv.DictReader(handle))
    if not rows or not {"moving", "fixed"} <= set(rows[0]):
        raise InputError(f"pairs file {path}: needs a header with at least the columns moving,fixed")
    base = path.parent

    def resolve(value: str | None) -> Path | None:
        return None if not value else (Path(value) if Path(value).is_absolute() else base / value)

    pairs = []
    for row in rows:
        moving, fixed = resolve(row["moving"]), resolve(row["fixed"])
        if moving is None or fixed is None:
            raise InputError(f"pairs file {path}: a row has no moving or fixed image ({row})")
        name = row.get("name") or f"{image_stem(moving)}->{image_stem(fixed)}"
        pairs.append(PairSpec(name, moving, fixed, *(resolve(row.get(k)) for k in ROLES[2:])))
    return _unique_names(pairs)


def pairs_from_dataset_json(path: str | Path) -> list[PairSpec]:
    """Pairs of a Learn2Reg-style dataset JSON: ``registration_val``, else consecutive ``validation`` subjects."""
    from ..datasets import read_dataset_json

    dataset = read_dataset_json(path)
    subjects = {str(s.image): s for s in dataset.training + dataset.validation}
    listed = dataset.validation_pairs
    if not listed:
        val = dataset.validation
        listed = [(val[i].image, val[i + 1].image) for i in range(len(val) - 1)]
    if not listed:
        raise InputError(f"dataset JSON {path}: no 'registration_val' pairs and fewer than 2 'validation' images")
    pairs = []
    for moving, fixed in listed:
        m, f = subjects.get(str(moving)), subjects.get(str(fixed))
        pairs.append(
            PairSpec(
                f"{image_stem(moving)}->{image_stem(fixed)}",
                moving,
                fixed,
                m.label if m else None,
                f.label if f else None,
                f.mask if f else None,
            )
        )
    return _unique_names(pairs)


def pairs_from_atlas(
    atlas: str | Path,
    images_dir: str | Path,
    atlas_labels: str | Path | None = None,
    labels_dir: str | Path | None = None,
    pattern: str = "*",
    atlas_mask: str | Path | None = None,
) -> list[PairSpec]:
    """Every image of a folder (moving) onto one atlas (fixed); labels of the same file name in ``labels_dir``."""
    from ..datasets import subjects_from_folder

    atlas = Path(atlas)
    found = subjects_from_folder(images_dir, pattern, labels_dir)
    subjects = [s for s in found if s.image.resolve() != atlas.resolve()]
    label = Path(atlas_labels) if atlas_labels else None
    mask = Path(atlas_mask) if atlas_mask else None
    return _unique_names(
        [PairSpec(f"{s.name}->{image_stem(atlas)}", s.image, atlas, s.label, label, mask) for s in subjects]
    )


def _header(path: Path) -> tuple:
    """Size, spacing, origin and direction from the file's header only (a singleton 4th axis dropped)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size, spacing, origin = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin()
    direction = np.reshape(reader.GetDirection(), (len(size), len(size)))
    if len(size) == 4 and size[3] == 1:
        size, spacing, origin, direction = size[:3], spacing[:3], origin[:3], direction[:3, :3]
    if len(size) != 3:
        raise InputError(f"{path}: a {len(size)}-D image of size {size}; a 3-D volume is needed")
    return size, np.array(spacing), np.array(origin), direction.ravel()


def _grid_problem(labels: tuple, image: tuple, tol: float = 1e-3) -> str | None:
    problems = []
    if tuple(labels[0]) != tuple(image[0]):
        problems.append(f"size {tuple(labels[0])} vs {tuple(image[0])}")
    for name, a, b in zip(("spacing", "origin", "direction"), labels[1:], image[1:]):
        if not np.allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max()))):
            problems.append(f"{name} {tuple(np.round(a, 3))} vs {tuple(np.round(b, 3))}")
    return "; ".join(problems) or None


def check_pairs(pairs: list[PairSpec]) -> None:
    """Every file exists and is an image; every label map and mask is on its image's grid. All problems at once."""
    if not pairs:
        raise InputError("no pairs to evaluate")
    problems, headers = [], {}
    for pair in pairs:
        for role, path in pair.files().items():
            if path not in headers:
                try:
                    if not Path(path).is_file():
                        raise InputError(f"{path}: file not found")
                    headers[path] = _header(Path(path))
                except (InputError, RuntimeError) as err:
                    headers[path] = None
                    problems.append(f"pair {pair.name}, {role.replace('_', ' ')}: {str(err).strip().splitlines()[0]}")
        for role, image in (
            ("moving_labels", "moving"),
            ("fixed_labels", "fixed"),
            ("mask", "fixed"),
            ("moving_mask", "moving"),
        ):
            path = getattr(pair, role)
            if path is not None and headers.get(path) and headers.get(getattr(pair, image)):
                problem = _grid_problem(headers[path], headers[getattr(pair, image)])
                if problem:
                    what = role.replace("_", " ")
                    problems.append(f"pair {pair.name}, {what} {path}: does not match its {image} image ({problem})")
    if problems:
        raise InputError(f"{len(problems)} problem(s) with the pairs:\n  " + "\n  ".join(dict.fromkeys(problems)))


def load_pair(pair: PairSpec):
    """Read one pair (validated by the engine's readers)."""
    from ..core import imaging
    from .baselines import PairImages

    moving = imaging.read_image(pair.moving, "moving image")
    fixed = imaging.read_image(pair.fixed, "fixed image")

    def labels(path, reference, what):
        return None if path is None else imaging.read_labels(path, reference, what)

    return PairImages(
        pair.name,
        moving,
        fixed,
        labels(pair.moving_labels, moving, "moving labels"),
        labels(pair.fixed_labels, fixed, "fixed labels"),
        labels(pair.mask, fixed, "mask"),
        labels(pair.moving_mask, moving, "moving mask"),
    )


__all__ = ["PairSpec", "check_pairs", "load_pair", "pairs_from_atlas", "pairs_from_csv", "pairs_from_dataset_json"]
