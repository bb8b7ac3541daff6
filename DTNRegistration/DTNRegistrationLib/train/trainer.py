"""Training of DTN-family models: unsupervised (paper) loss on real and/or synthetic pairs, resumable exactly.

Loss (paper, Eq. 2): ``sim(warp(moving, exp(v)), fixed) + alpha * ||grad v||^2`` with ``sim`` = L1 by default,
Adam(lr 1e-4, betas (0.5, 0.999)), batch 1; optionally ``+ dice_weight * soft Dice`` on labelled pairs.
Alpha-conditioned models see a log-uniform alpha from ``alpha_range`` each step.

Checkpoints (``output_dir``): ``last.state.pt`` holds everything a resume needs (model and optimizer
tensors, step, every RNG state, configurations; loadable with ``torch.load(weights_only=True)``) and is
the authority; ``last.safetensors`` is the same model as plain weights; ``model.safetensors`` the final
weights. Each file is written atomically, so killing the process never damages the last good one.

Distributed: run under ``torchrun``; with ``WORLD_SIZE > 1`` the model is wrapped in
DistributedDataParallel (NCCL on CUDA, Gloo on CPU), each rank samples pairs from its own seed, and only
rank 0 writes files and logs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.models import read_weights, save_weights
from ..core.network import DTN, build_model, to_device
from ..errors import ModelError
from ..files import atomic_write
from . import pairs, synth
from .checkpoints import (
    BEST_WEIGHTS,
    FINAL_WEIGHTS,
    LAST_WEIGHTS,
    STATE_FILE,
    STATE_FORMAT,
    check_architecture,
    load_state,
    rng_state,
    set_rng_state,
)
from .config import TrainConfig
from .distributed import any_rank, setup_distributed
from .run_log import RunLog
from .steps import compute_loss, sample_alpha, validate

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
MAX_BAD_STEPS = 10  # non-finite losses in a row before the run gives up (single ones are skipped)
RATE_AFTER_STEPS = 20  # the throughput is reported once, over the first steps of the run


def weights_info(cfg: TrainConfig, step: int, description: str) -> dict:
    """What goes with the weights (inference reads ``spacing_mm``)."""
    return {
        "spacing_mm": cfg.data.spacing_mm,
        "step": step,
        "training_data": description,
        "similarity": cfg.similarity,
        "alpha_range": list(cfg.alpha_range) if cfg.alpha_conditioned else None,
        "alpha": cfg.alpha,
        "shape": list(cfg.data.shape),
        "seed": cfg.seed,
        "dice_weight": cfg.dice_weight,
        "field_weight": cfg.field_weight,
    }


# ---------------------------------------------------------------------------------------------- training


class _StopFlag:
    """Set by SIGTERM/SIGINT so the run checkpoints and ends cleanly (e.g. a cluster's preemption)."""

    def __init__(self) -> None:
        self.set = False
        self._old = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after this step and saving a checkpoint", signum)
        self.set = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One training run; ``run()`` returns the final weights' path."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.dist = setup_distributed(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = self.dist.device
        self.amp = cfg.amp and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one grid shape all run long: let cuDNN pick its fastest kernels
        self._seed_all()
        self.state = load_state(cfg.resume) if cfg.resume else None
        if self.state is not None:  # before the (possibly long) data preparation
            check_architecture(json.loads(self.state["dtn_config"]), cfg.model_config(), f"checkpoint {cfg.resume}")
        self.sources, self.val_pairs, self.description = self._build_data()
        self.core = self._build_model()
        self.model = self._wrap(self.core)
        self.optimizer = torch.optim.Adam(self.core.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.step = 0
        self.best_dice = -1.0
        self.elapsed_before = 0.0
        self.bad_steps = 0
        if self.state is not None:
            self._restore(self.state)
        self.first_step = self.step
        self.steps_per_second: float | None = None
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(
                self.out / CONFIG_FILE,
                lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8"),
            )
        self.log = RunLog(self.out, self.step if self.state is not None else None, self.dist.main)

    def _seed_all(self) -> None:
        """Same model initialisation on every rank; each rank its own data stream."""
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed % 2**32)
        torch.manual_seed(self.cfg.seed)
        self.gen = synth.make_generator(self.cfg.seed * 1000003 + self.dist.rank, self.device)

    def _build_data(self):
        cfg = self.cfg
        real = None
        if cfg.prepared_data:
            real = pairs.load_prepared(cfg.prepared_data)
        elif cfg.data.images_dir or cfg.data.dataset_json or cfg.data.atlas:
            from . import volumes as data_mod  # SimpleITK: only where image files are read

            real = data_mod.load_real_data(cfg.dataset_spec(), (self.dist.rank, self.dist.world), self.dist.barrier)
        real_source = pairs.RealPairSource(real, cfg.p_same, cfg.augment) if real is not None else None
        shape = real_source.shape if real_source is not None else cfg.data.shape
        if real_source is not None and tuple(shape) != tuple(cfg.data.shape):
            raise ValueError(f"the real volumes are {tuple(shape)}, the configured grid {tuple(cfg.data.shape)}")
        synth_cfg = synth.SynthConfig(num_labels=cfg.synth_labels, contrast=cfg.synth_contrast)
        synth_source = None
        if cfg.synthetic:  # the true field costs an inverse per pair: only where the loss uses it
            synth_source = pairs.SynthPairSource(shape, synth_cfg, true_field=cfg.field_weight > 0)
        source = pairs.MixedSource(real_source, synth_source, cfg.synth_fraction)
        val = []
        if self.dist.main and cfg.val_every > 0:
            val = pairs.validation_pairs(
                real, shape, cfg.val_synthetic, seed=12345, device=self.device, same_subject=cfg.val_same_subject
            )
        parts = [real.description] if real is not None else []
        if synth_source is not None:
            parts.append(f"synthetic pairs ({cfg.synth_labels} labels, {cfg.synth_contrast} contrast)")
        if real is not None and synth_source is not None:
            parts.append(f"synthetic fraction {cfg.synth_fraction}")
        return source, val, "; ".join(parts)

    def _build_model(self) -> DTN:
        model = build_model(self.cfg.model_config())
        if self.cfg.init and self.state is None:
            tensors, config, _, _ = read_weights(self.cfg.init)
            check_architecture(config, model.cfg, f"initial weights {self.cfg.init}")
            model.load_state_dict(tensors, strict=True)
            log.info("initialised from %s", self.cfg.init)
        return to_device(model, self.device)

    def _wrap(self, core: DTN):
        if not self.dist.enabled:
            return core
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)

    def _restore(self, state: dict) -> None:
        if state["world_size"] != self.dist.world:
            raise ModelError(
                f"checkpoint {self.cfg.resume} was written by {state['world_size']} process(es); "
                f"resume it with the same number (got {self.dist.world})"
            )
        self.core.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_dice = float(state.get("best_dice", -1.0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        set_rng_state(state["rng"][self.dist.rank], self.gen)
        log.info("resumed from %s at step %d", self.cfg.resume, self.step)

    # -- one step

    def learning_rate(self, elapsed_s: float) -> float:
        """The schedule's rate for the next step: linear warm-up, then constant or cosine to lr/10, whose
        progress is the larger of the steps' and the minutes' fractions (a time-limited run ends decayed)."""
        cfg = self.cfg
        warm = min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        if cfg.lr_schedule == "constant":
            return cfg.lr * warm
        progress = self.step / max(cfg.max_steps, 1)
        if cfg.max_minutes:
            progress = max(progress, elapsed_s / (cfg.max_minutes * 60))
        progress = min(1.0, progress)
        return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def train_step(self, elapsed_s: float = 0.0) -> dict:
        pair = self.sources.sample(self.gen, self.cfg.batch_size).to(self.device)
        source = self.sources.last
        alpha = sample_alpha(self.cfg, self.gen, pair.moving.shape[0])
        use_dice = source == "synthetic" or self.cfg.dice_real
        loss, parts = compute_loss(self.model, self.core, pair, alpha, self.cfg, use_dice, self.amp)
        if any_rank(self.dist, not bool(torch.isfinite(loss))):  # every rank skips it, none waits forever
            self.bad_steps += 1
            log.warning("loss is %s at step %d: step skipped", loss.item(), self.step + 1)
            if self.bad_steps >= MAX_BAD_STEPS:
                raise FloatingPointError(
                    f"loss not finite for {self.bad_steps} steps in a row at step {self.step + 1}; "
                    "lower --lr or check the data"
                )
            return {}
        self.bad_steps = 0
        lr = self.learning_rate(elapsed_s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        row = {"step": self.step, "source": source, "alpha": float(alpha.mean()), "loss": loss.item(), **parts}
        return self._mean_over_ranks(row) | {"lr": lr}

    def _mean_over_ranks(self, row: dict) -> dict:
        """Log the loss averaged over ranks (each rank saw a different pair)."""
        if not self.dist.enabled:
            return row
        keys = [k for k in ("loss", "similarity", "smoothness") if isinstance(row.get(k), float)]
        t = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return row | {k: float(v) / self.dist.world for k, v in zip(keys, t.tolist())}

    # -- checkpoints

    def save_checkpoint(self, elapsed: float) -> None:
        """All ranks gather their RNG states; rank 0 writes the state, then the plain weights."""
        rng = rng_state(self.gen)
        states = [None] * self.dist.world
        if self.dist.enabled:
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if not self.dist.main:
            return
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "model": {k: v.detach().cpu().clone() for k, v in self.core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "dtn_config": json.dumps(self.core.cfg.to_dict()),
            "train_config": json.dumps(self.cfg.to_dict()),
            "rng": states,
            "world_size": self.dist.world,
            "best_dice": self.best_dice,
            "elapsed_s": elapsed,
        }
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))
        save_weights(self.core, self.out / LAST_WEIGHTS, weights_info(self.cfg, self.step, self.description))

    def run_validation(self, elapsed: float) -> dict:
        if not self.dist.main or not self.val_pairs:
            return {}
        result = validate(self.core, self.val_pairs, self.cfg.alpha, self.amp)
        if not math.isnan(result["val_dice"]) and result["val_dice"] > self.best_dice:
            self.best_dice = result["val_dice"]
            info = weights_info(self.cfg, self.step, self.description) | {"val": result}
            save_weights(self.core, self.out / BEST_WEIGHTS, info)
        self.log.write({"step": self.step, "time_s": elapsed, "source": "validation", **result})
        log.info("step %d validation: %s", self.step, result)
        return result

    def run(self) -> Path:
        cfg = self.cfg
        start = time.monotonic()
        deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else None
        bar = self._progress_bar()
        last_saved = self.step
        with _StopFlag() as stop:
            while self.step < cfg.max_steps:
                row = self.train_step(time.monotonic() - start)
                elapsed = self.elapsed_before + time.monotonic() - start
                if row and (self.step % max(1, cfg.log_every) == 0 or self.step == cfg.max_steps):
                    self.log.write({**row, "time_s": elapsed})
                if bar is not None and row:
                    self._show(bar, row, deadline)
                if row and self.step == self.first_step + RATE_AFTER_STEPS:
                    self._report_rate(time.monotonic() - start)
                if cfg.val_every > 0 and self.step % cfg.val_every == 0:
                    self.run_validation(elapsed)
                timed_out = deadline is not None and time.monotonic() >= deadline
                if any_rank(self.dist, stop.set or timed_out):
                    log.info("stopping at step %d (%s)", self.step, "time limit" if timed_out else "signal")
                    break
                if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(elapsed)
                    last_saved = self.step
        elapsed = self.elapsed_before + time.monotonic() - start
        if self.step != last_saved:  # the same decision on every rank (all of them take part)
            self.save_checkpoint(elapsed)
        if bar is not None:
            bar.close()
        final = self.out / FINAL_WEIGHTS
        if self.dist.main:
            save_weights(self.core, final, weights_info(self.cfg, self.step, self.description))
            log.info("final weights: %s (step %d, %.1f min)", final, self.step, elapsed / 60)
        self.log.close()
        self.dist.barrier()
        return final

    def _report_rate(self, seconds: float) -> None:
        """Steps per second over the first steps (start-up and cuDNN's kernel search included), said once."""
        self.steps_per_second = RATE_AFTER_STEPS / max(seconds, 1e-9)
        if self.dist.main:
            log.info(
                "throughput: %.2f steps/s (%.1f pairs/s, batch %d, %s%s)",
                self.steps_per_second,
                self.steps_per_second * self.cfg.batch_size * self.dist.world,
                self.cfg.batch_size,
                self.device,
                ", bf16" if self.amp else "",
            )

    @staticmethod
    def _show(bar, row: dict, deadline: float | None) -> None:
        """Loss and source; with a time limit, the minutes left too (the bar's ETA counts max steps)."""
        extra = {}
        if deadline is not None:
            extra["min_left"] = f"{max(0.0, deadline - time.monotonic()) / 60:.1f}"
        bar.set_postfix(loss=f"{row['loss']:.4f}", src=row["source"][:4], **extra, refresh=False)
        bar.update(1)

    def _progress_bar(self):
        if not (self.cfg.progress and self.dist.main):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) a model as ``cfg`` says; returns the path of the final weights."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["CONFIG_FILE", "Trainer", "train"]
