"""Training pairs from prepared volumes: real (augmented), synthetic, or a mix; validation pairs; bundles.

Nothing here reads image files or needs SimpleITK: ``data`` prepares real images onto the model grid, and
``save_prepared`` / ``load_prepared`` carry them as one ``.npz`` to a machine without SimpleITK (the GPU job).
Pairs are sampled with a ``torch.Generator`` (see ``synth``), so sampling is deterministic and resumable;
everything runs on the generator's device, and real volumes are copied there once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import synth

Shape = tuple[int, int, int]
PREPARED_FORMAT = 1


@dataclass
class Volume:
    """A prepared image on the model grid, ``(D, H, W)`` float32 in [0, 1], with labels (contiguous ids) or None."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = torch.tensor(np.asarray(self.image, dtype=np.float32))[None, None]  # a copy: caches are read-only
        labels = None
        if self.labels is not None:
            labels = torch.tensor(np.asarray(self.labels, dtype=np.int64))[None, None]
        return image, labels


@dataclass
class RealData:
    """Prepared real volumes and how to pair them."""

    train: list[Volume]
    atlas: Volume | None = None
    train_pairs: list[tuple[int, int]] = field(default_factory=list)  # (moving, fixed) indices into train
    val_pairs: list[tuple[Volume, Volume]] = field(default_factory=list)
    description: str = ""


# ---------------------------------------------------------------------------------------------- bundles


def save_prepared(path: str | Path, real: RealData) -> Path:
    """Write prepared training volumes (images as float16, labels as int16) and their pairing into one ``.npz``."""
    if real.atlas is not None or real.val_pairs:
        raise ValueError("a prepared bundle holds training images and pairs only (no atlas, no validation pairs)")
    arrays, meta = {}, {"format": PREPARED_FORMAT, "description": real.description, "volumes": []}
    for i, vol in enumerate(real.train):
        arrays[f"image{i}"] = np.asarray(vol.image, dtype=np.float16)
        if vol.labels is not None:
            arrays[f"labels{i}"] = np.asarray(vol.labels, dtype=np.int16)
        meta["volumes"].append({"name": vol.name, "labels": vol.labels is not None})
    meta["train_pairs"] = [list(p) for p in real.train_pairs]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def load_prepared(path: str | Path) -> RealData:
    """The ``RealData`` of a bundle written by ``save_prepared``; a ValueError names what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prepared data {path}: file not found")
    with np.load(path, allow_pickle=False) as bundle:
        if "meta" not in bundle:
            raise ValueError(f"prepared data {path}: not a bundle written by save_prepared (no 'meta')")
        meta = json.loads(bundle["meta"].tobytes().decode())
        if meta.get("format") != PREPARED_FORMAT:
            raise ValueError(f"prepared data {path}: format {meta.get('format')}, expected {PREPARED_FORMAT}")
        train = []
        for i, info in enumerate(meta["volumes"]):
            labels = bundle[f"labels{i}"].astype(np.int64) if info["labels"] else None
            train.append(Volume(info["name"], bundle[f"image{i}"].astype(np.float32), labels))
    if not train:
        raise ValueError(f"prepared data {path}: holds no volumes")
    shapes = {v.image.shape for v in train}
    if len(shapes) != 1:
        raise ValueError(f"prepared data {path}: volumes of different shapes {sorted(shapes)}")
    pairs = [tuple(p) for p in meta.get("train_pairs", [])]
    return RealData(train, train_pairs=pairs, description=f"prepared bundle {path.name}: {meta['description']}")


# ---------------------------------------------------------------------------------------------- sampling


def _randint(gen: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=gen, device=gen.device).item())


def _rand(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen, device=gen.device).item())


class RealPairSource:
    """Augmented real pairs: an atlas as fixed, explicit pairs, or random pairs (possibly the same subject)."""

    def __init__(
        self,
        data: RealData,
        p_same: float = 0.2,
        augment: bool = True,
        augment_cfg: synth.AugmentConfig | None = None,
    ) -> None:
        self.data = data
        self.p_same = p_same
        self.augment = augment
        self.augment_cfg = augment_cfg or synth.AugmentConfig()
        self._on_device: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def shape(self) -> Shape:
        return tuple(self.data.train[0].image.shape)

    def _pick(self, gen: torch.Generator) -> tuple[Volume, Volume]:
        train = self.data.train
        if self.data.atlas is not None:
            return train[_randint(gen, len(train))], self.data.atlas
        if self.data.train_pairs:
            m, f = self.data.train_pairs[_randint(gen, len(self.data.train_pairs))]
            return train[m], train[f]
        a = _randint(gen, len(train))
        if len(train) == 1 or _rand(gen) < self.p_same:
            return train[a], train[a]
        b = (a + 1 + _randint(gen, len(train) - 1)) % len(train)
        return train[a], train[b]

    def _tensors(self, vol: Volume, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The volume's tensors on ``device``, copied there once (no host-side loading in the training loop)."""
        key = (id(vol), str(device))
        if key not in self._on_device:
            image, labels = vol.tensors()
            self._on_device[key] = (image.to(device), None if labels is None else labels.to(device))
        return self._on_device[key]

    def _view(self, gen: torch.Generator, vol: Volume, spatial_aug: bool):
        image, labels = self._tensors(vol, gen.device)
        if not self.augment:
            return image.clone(), None if labels is None else labels.clone()
        return synth.augment(gen, image, labels, self.augment_cfg, spatial_aug=spatial_aug)

    def sample(self, gen: torch.Generator, batch: int = 1) -> synth.Pair:
        pairs = []
        for _ in range(batch):
            moving, fixed = self._pick(gen)
            m, ml = self._view(gen, moving, True)
            f, fl = self._view(gen, fixed, self.data.atlas is None)  # the atlas stays in place
            pairs.append((m, f, ml, fl))
        return _stack(pairs)


class SynthPairSource:
    """On-the-fly synthetic pairs of a fixed grid shape; ``true_field``: with their true displacement."""

    def __init__(self, shape: Shape, cfg: synth.SynthConfig | None = None, true_field: bool = True) -> None:
        self.shape = tuple(shape)
        self.cfg = cfg or synth.SynthConfig()
        self.true_field = true_field

    def sample(self, gen: torch.Generator, batch: int = 1) -> synth.Pair:
        return synth.synth_pair(gen, self.shape, batch, self.cfg, true_field=self.true_field)


class MixedSource:
    """Synthetic pairs with probability ``p_synth``, real ones otherwise; remembers which it drew last."""

    def __init__(self, real: RealPairSource | None, synthetic: SynthPairSource | None, p_synth: float) -> None:
        if real is None and synthetic is None:
            raise ValueError("no training data: give --images-dir, --dataset-json and/or --synthetic")
        self.real, self.synthetic = real, synthetic
        self.p_synth = 1.0 if real is None else (0.0 if synthetic is None else float(p_synth))
        self.last = ""

    def sample(self, gen: torch.Generator, batch: int = 1) -> synth.Pair:
        use_synth = self.p_synth >= 1.0 or (self.p_synth > 0.0 and _rand(gen) < self.p_synth)
        self.last = "synthetic" if use_synth else "real"
        return (self.synthetic if use_synth else self.real).sample(gen, batch)


def _stack(items) -> synth.Pair:
    def cat(i):
        parts = [it[i] for it in items]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return synth.Pair(*(cat(i) for i in range(len(items[0]))))


def validation_pairs(
    real: RealData | None,
    shape: Shape,
    count_synth: int,
    seed: int,
    device: torch.device | str = "cpu",
    same_subject: int = 0,
) -> list[tuple[str, synth.Pair]]:
    """Fixed labelled pairs to validate on: the real ones listed, ``count_synth`` synthetic pairs, and
    ``same_subject`` pairs per labelled training subject: two random deformations of one real brain, whose
    labels follow them (the known-deformation case: the answer is known exactly)."""
    out = []
    if real is not None:
        for moving, fixed in real.val_pairs:
            m, ml = moving.tensors()
            f, fl = fixed.tensors()
            out.append((f"{moving.name}->{fixed.name}", synth.Pair(m, f, ml, fl).to(device)))
    gen = synth.make_generator(seed, device)
    for i in range(count_synth):
        out.append((f"synthetic-{i}", synth.synth_pair(gen, shape, 1)))
    if real is not None and same_subject > 0:
        source = RealPairSource(real, augment=True)
        for vol in (v for v in real.train if v.labels is not None):
            for i in range(same_subject):
                m, ml = source._view(gen, vol, True)
                f, fl = source._view(gen, vol, True)
                out.append((f"{vol.name}-deformed-{i}", synth.Pair(m, f, ml, fl)))
    return out


__all__ = [
    "MixedSource",
    "RealData",
    "RealPairSource",
    "SynthPairSource",
    "Volume",
    "load_prepared",
    "save_prepared",
    "validation_pairs",
]
