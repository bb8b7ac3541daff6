"""Training data: real images (a folder, or a Learn2Reg/OASIS dataset JSON) prepared onto the model grid.

Real images are prepared with the same functions as inference (``imaging``): read and validate,
normalise intensities to [0, 1], optionally align affinely to a template, and resample onto the template's
model grid (identity direction, isotropic ``spacing_mm``). Prepared volumes are cached as ``.npy`` files
keyed by each file's path, size, mtime and the preparation settings, so a restart costs no preprocessing.
All input is checked before training starts; a problem raises ``DataError`` naming the file.

Finding the images is ``datasets``' work (shared with evaluation); sampling pairs from the prepared volumes is
``pairs``' (it needs no SimpleITK).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813

from ..core.imaging import (
    affine_initialisation,
    model_reference,
    normalize_intensity,
    read_image,
    read_labels,
    resample,
)
from ..datasets import JsonDataset, Subject, read_dataset_json, subjects_from_folder
from ..errors import DataError, InputError
from ..files import atomic_write
from .config import DatasetSpec
from .pairs import RealData, Volume

log = logging.getLogger(__name__)

CACHE_VERSION = 1
Shape = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------- preparation


@dataclass
class Preparer:
    """Prepare subjects onto one model grid (the template's), with an on-disk cache."""

    template: Subject
    spacing_mm: float
    shape: Shape
    align: str = "affine"
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.align not in ("affine", "none"):
            raise DataError(f"align must be 'affine' or 'none', got {self.align!r}")
        self._template_image: sitk.Image | None = None
        self._reference: sitk.Image | None = None

    @property
    def template_image(self) -> sitk.Image:
        if self._template_image is None:
            self._template_image = read_image(self.template.image, "template image")
        return self._template_image

    @property
    def reference(self) -> sitk.Image:
        """The model grid: the template's, of size ``shape`` (array order; sitk's is reversed)."""
        if self._reference is None:
            size = tuple(int(n) for n in reversed(self.shape))
            self._reference = model_reference(self.template_image, self.spacing_mm, size=size)
        return self._reference

    def key(self, subject: Subject) -> str:
        """Cache key: the files' identity (path, size, mtime) and every setting that changes the result."""

        def ident(path: Path | None):
            if path is None:
                return None
            st = path.stat()
            return [str(path.resolve()), st.st_size, st.st_mtime_ns]

        payload = {
            "v": CACHE_VERSION,
            "image": ident(subject.image),
            "label": ident(subject.label),
            "mask": ident(subject.mask),
            "template": ident(self.template.image),
            "spacing": float(self.spacing_mm),
            "shape": list(self.shape),
            "align": self.align,
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def prepare(self, subject: Subject) -> tuple[np.ndarray, np.ndarray | None]:
        """Read, check, normalise, align and resample one subject (no cache)."""
        image = read_image(subject.image)
        labels = read_labels(subject.label, reference=image) if subject.label else None
        mask = read_labels(subject.mask, reference=image, what="mask") if subject.mask else None
        normalised = normalize_intensity(image, mask)
        transform = None
        is_template = subject.image.resolve() == self.template.image.resolve()
        if self.align == "affine" and not is_template:
            transform = affine_initialisation(image, self.template_image)
        arr = sitk.GetArrayFromImage(resample(normalised, self.reference, "linear", transform)).astype(np.float32)
        lab = None
        if labels is not None:
            lab = sitk.GetArrayFromImage(resample(labels, self.reference, "nearest", transform)).astype(np.int32)
        return arr, lab

    def load(self, subject: Subject) -> Volume:
        """The prepared subject, from the cache when it is there (memory-mapped)."""
        if self.cache_dir is None:
            arr, lab = self.prepare(subject)
            return Volume(subject.name, arr, lab)
        key = self.key(subject)
        image_file = self.cache_dir / f"{subject.name}-{key}.image.npy"
        label_file = self.cache_dir / f"{subject.name}-{key}.label.npy"
        if not image_file.is_file():
            arr, lab = self.prepare(subject)
            if lab is not None:
                _save_npy(label_file, lab)
            _save_npy(image_file, arr)  # last: its presence marks a complete entry
        labels = np.load(label_file, mmap_mode="r") if subject.label is not None else None
        return Volume(subject.name, np.load(image_file, mmap_mode="r"), labels)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


def prepare_all(
    preparer: Preparer, subjects: Sequence[Subject], workers: int = 2, shard: tuple[int, int] = (0, 1)
) -> list[Volume]:
    """Prepare every subject (in threads), raising the first DataError with the file it concerns.

    With ``shard = (rank, world)`` only every world-th subject is prepared here (to fill a shared cache).
    """
    rank, world = shard
    todo = [s for i, s in enumerate(subjects) if i % world == rank]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(_load_checked, preparer, s) for s in todo]
        return [f.result() for f in futures]


def _load_checked(preparer: Preparer, subject: Subject) -> Volume:
    try:
        return preparer.load(subject)
    except DataError:
        raise
    except InputError as err:
        raise DataError(str(err)) from None
    except (RuntimeError, OSError) as err:
        raise DataError(f"image {subject.image}: preparation failed ({err})") from err


def remap_labels(volumes: Sequence[Volume]) -> list[int]:
    """Map every label map to contiguous ids 0..L-1 (0 stays background); returns the original values."""
    values = sorted({int(v) for vol in volumes if vol.labels is not None for v in np.unique(vol.labels)} | {0})
    for vol in volumes:
        if vol.labels is not None:
            flat = np.searchsorted(values, np.asarray(vol.labels))
            vol.labels = flat.astype(np.int16 if len(values) < 32768 else np.int32)
    return values


def load_real_data(spec: DatasetSpec, shard: tuple[int, int] = (0, 1), barrier: Callable[[], None] | None = None):
    """Discover, check and prepare the real data of ``spec``: a ``RealData``, or None without real data.

    In a distributed run every rank prepares its shard into the shared cache, waits at ``barrier``, then
    loads everything from the cache.
    """
    if not spec.has_real:
        if spec.atlas:
            raise DataError("an atlas needs moving images: give --images-dir or --dataset-json")
        return None
    if spec.images_dir and spec.dataset_json:
        raise DataError("give either --images-dir or --dataset-json, not both")
    if spec.dataset_json:
        dataset = read_dataset_json(spec.dataset_json)
        description = f"dataset JSON {Path(spec.dataset_json).resolve()}"
    else:
        subjects = subjects_from_folder(spec.images_dir, spec.images_glob, spec.labels_dir)
        dataset = JsonDataset(subjects, [], [], [])
        description = f"images folder {Path(spec.images_dir).resolve()} ({spec.images_glob})"
    atlas = None
    if spec.atlas:
        atlas = Subject(Path(spec.atlas), Path(spec.atlas_labels) if spec.atlas_labels else None)
    train_subjects, val_pairs = _split(dataset)
    template = atlas or (Subject(Path(spec.template)) if spec.template else train_subjects[0])
    cache = Path(spec.cache_dir) if spec.cache_dir else None
    preparer = Preparer(template, spec.spacing_mm, tuple(spec.shape), spec.align, cache)
    everything = _unique(train_subjects + [s for pair in val_pairs for s in pair] + ([atlas] if atlas else []))
    if cache is not None and shard[1] > 1:
        prepare_all(preparer, everything, spec.workers, shard)
        if barrier is not None:
            barrier()
    volumes = {str(s.image): v for s, v in zip(everything, prepare_all(preparer, everything, spec.workers))}
    remap_labels(list(volumes.values()))
    train = [volumes[str(s.image)] for s in train_subjects]
    index = {str(s.image): i for i, s in enumerate(train_subjects)}
    train_pairs = []
    for moving, fixed in dataset.training_pairs:
        if str(moving) not in index or str(fixed) not in index:
            raise DataError(f"training pair ({moving}, {fixed}): both images must be in the 'training' list")
        train_pairs.append((index[str(moving)], index[str(fixed)]))
    description += f", {len(train)} training images"
    if atlas:
        description += f", atlas {atlas.image.resolve()}"
    log.info("real data: %s, %d validation pairs", description, len(val_pairs))
    return RealData(
        train=train,
        atlas=volumes[str(atlas.image)] if atlas else None,
        train_pairs=train_pairs,
        val_pairs=[(volumes[str(m.image)], volumes[str(f.image)]) for m, f in val_pairs],
        description=description,
    )


def _unique(subjects: Sequence[Subject]) -> list[Subject]:
    seen, out = set(), []
    for s in subjects:
        if str(s.image) not in seen:
            seen.add(str(s.image))
            out.append(s)
    return out


def _split(dataset: JsonDataset) -> tuple[list[Subject], list[tuple[Subject, Subject]]]:
    """Training subjects (validation images excluded) and labelled validation pairs."""
    known = {str(s.image): s for s in dataset.training + dataset.validation}
    val_pairs = []
    for moving, fixed in dataset.validation_pairs:
        m = known.get(str(moving), Subject(moving))
        f = known.get(str(fixed), Subject(fixed))
        val_pairs.append((m, f))
    if not val_pairs and len(dataset.validation) >= 2:
        val = dataset.validation
        val_pairs = [(val[i], val[i + 1]) for i in range(len(val) - 1)]
    val_images = {str(s.image) for pair in val_pairs for s in pair}
    train = [s for s in dataset.training if str(s.image) not in val_images]
    if not train:
        raise DataError("no training images left once the validation images are set aside")
    val_pairs = [(m, f) for m, f in val_pairs if m.label is not None and f.label is not None]
    return train, val_pairs


__all__ = ["DatasetSpec", "Preparer", "load_real_data", "prepare_all", "remap_labels"]
