"""What a training run depends on: the data (``DatasetSpec``) and everything else (``TrainConfig``).

SimpleITK-free, so that a job without SimpleITK (scripts/gpu_job.py) builds its configuration, and torch-free, so
that building `dtnreg`'s argument parser does not load torch (the register command loads it in a thread).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import ALPHA_RANGE, DEFAULT_ALPHA, SIMILARITY_TERMS

if TYPE_CHECKING:
    from ..core.network import DTNConfig

Shape = tuple[int, int, int]


@dataclass
class DatasetSpec:
    """Where the real data is and how to prepare it: the model grid, the alignment, the cache."""

    images_dir: str | None = None
    images_glob: str = "*"
    labels_dir: str | None = None
    dataset_json: str | None = None
    atlas: str | None = None
    atlas_labels: str | None = None
    template: str | None = None
    spacing_mm: float = 2.0
    shape: Shape = (96, 112, 96)
    align: str = "affine"
    cache_dir: str | None = None
    workers: int = 2

    @property
    def has_real(self) -> bool:
        return bool(self.images_dir or self.dataset_json)


DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DatasetSpec))


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved with its checkpoints)."""

    output_dir: str = "dtn-training"
    # data
    synthetic: bool = False
    synth_fraction: float = 0.5  # share of synthetic pairs when mixing with real images
    synth_labels: int = 16
    synth_contrast: str = "shared"
    data: DatasetSpec = field(default_factory=DatasetSpec)  # the real images and the model grid
    prepared_data: str | None = None  # an .npz of volumes already on the model grid (pairs.save_prepared)
    augment: bool = True
    p_same: float = 0.2
    # model
    variant: str = "dtn"
    alpha_conditioned: bool = True
    alpha: float = DEFAULT_ALPHA
    alpha_range: tuple[float, float] = ALPHA_RANGE
    init: str | None = None
    model_options: dict = field(default_factory=dict)  # other DTNConfig settings (widths, heads, layers)
    # loss and optimiser
    similarity: str = "l1"
    dice_weight: float = 0.0
    dice_real: bool = False  # also use real label maps in the Dice term
    field_weight: float = 0.0  # weight of the end-point error to the true field, where known (synthetic pairs)
    symmetric: bool = False  # train the symmetric velocity (v(m, f) - v(f, m)) / 2, as the pipeline uses it
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": to lr/10 at max steps or max minutes, whichever comes first
    warmup_steps: int = 0  # linear warm-up of the learning rate (fine-tuning starts with a fresh optimiser)
    betas: tuple[float, float] = (0.5, 0.999)
    batch_size: int = 1
    grad_clip: float = 0.0  # 0 = off
    # run
    max_steps: int = 102400  # the paper's iterations
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    threads: int | None = None
    val_every: int = 500
    val_synthetic: int = 4
    val_same_subject: int = 0  # validation pairs per labelled real subject: two known deformations of it
    checkpoint_every: int = 500
    log_every: int = 10
    resume: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DatasetSpec(**self.data)
        self.data.shape = tuple(int(n) for n in self.data.shape)
        self.alpha_range = tuple(float(a) for a in self.alpha_range)
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.data.shape) != 3 or any(n <= 0 or n % 16 for n in self.data.shape):
            raise ValueError(f"shape must be 3 sizes, each a multiple of 16, got {self.data.shape}")
        if self.similarity not in SIMILARITY_TERMS:
            raise ValueError(f"unknown similarity {self.similarity!r}; choose one of {sorted(SIMILARITY_TERMS)}")
        if not (0 < self.alpha_range[0] <= self.alpha_range[1]):
            raise ValueError(f"alpha range must be 0 < low <= high, got {self.alpha_range}")
        reserved = {"variant", "alpha_conditioned", "alpha", "alpha_range"} & set(self.model_options)
        if reserved:
            raise ValueError(f"set {sorted(reserved)} with their own options, not in model options")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"learning-rate schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.prepared_data and (self.data.images_dir or self.data.dataset_json or self.data.atlas):
            raise ValueError("give prepared data or image files (--images-dir, --dataset-json, --atlas), not both")
        if self.field_weight < 0 or self.dice_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.batch_size < 1 or self.max_steps < 0 or self.data.spacing_mm <= 0:
            raise ValueError("batch size must be >= 1, max steps >= 0 and spacing > 0")

    def to_dict(self) -> dict:
        """Flat, as the command line names the settings (``train_config.json``, and the checkpoints' copy)."""
        values = dataclasses.asdict(self)
        return {**values.pop("data"), **values}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """From :meth:`to_dict`'s flat form (or with ``data`` nested); unknown keys are ignored."""
        values = dict(values)
        data = {**values.pop("data", {}), **{k: values.pop(k) for k in DATA_FIELDS if k in values}}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(data=DatasetSpec(**data), **{k: v for k, v in values.items() if k in known})

    def model_config(self) -> DTNConfig:
        from ..core.network import DTNConfig

        return DTNConfig(
            **self.model_options,
            variant=self.variant,
            alpha_conditioned=self.alpha_conditioned,
            alpha=self.alpha,
            alpha_range=self.alpha_range,
        )

    def dataset_spec(self) -> DatasetSpec:
        """The real data to prepare, its cache in the run's folder unless another is given."""
        return dataclasses.replace(self.data, cache_dir=self.data.cache_dir or str(Path(self.output_dir) / "cache"))


__all__ = ["DATA_FIELDS", "DatasetSpec", "TrainConfig"]
