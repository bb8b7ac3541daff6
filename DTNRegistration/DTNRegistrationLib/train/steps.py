"""One training step's loss, the alpha it is trained at, and the validation measures.

Loss (paper, Eq. 2): ``sim(warp(moving, exp(v)), fixed) + alpha * ||grad v||^2`` (``losses.paper_loss``, as
test-time refinement), plus ``dice_weight`` times a soft Dice on labelled pairs and ``field_weight`` times the
mean end-point error (voxels) to the true displacement where the pair knows it (synthetic pairs). With
``symmetric`` the loss is that of the symmetric velocity the pipeline uses, both directions in one batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from ..core import losses, metrics, spatial
from ..core.network import DTN, symmetric
from . import synth
from .config import TrainConfig


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(labels[:, 0].long(), classes).permute(0, 4, 1, 2, 3).float()


def sample_alpha(cfg: TrainConfig, gen: torch.Generator, batch: int = 1) -> torch.Tensor:
    """One alpha per pair of the batch, ``(B,)`` on the generator's device: log-uniform over the alpha range
    for conditioned models, the fixed alpha otherwise."""
    if not cfg.alpha_conditioned:
        return torch.full((batch,), float(cfg.alpha), device=gen.device)
    lo, hi = (math.log(a) for a in cfg.alpha_range)
    return torch.exp(lo + (hi - lo) * torch.rand((batch,), generator=gen, device=gen.device))


def compute_loss(model, core: DTN, pair: synth.Pair, alpha, cfg: TrainConfig, use_dice: bool, amp: bool):
    """The training loss of one batch and its parts (floats); ``alpha`` is a float or one per pair ``(B,)``."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    with autocast:
        if cfg.symmetric:  # as the pipeline runs it (DTN.symmetric_velocity), through the training wrapper
            v = symmetric(model, pair.moving, pair.fixed, torch.as_tensor(alpha, device=pair.moving.device))
        else:
            v = model(pair.moving, pair.fixed, alpha)
    v = v.float()
    u = core.displacement(v, tuple(pair.fixed.shape[2:]))
    warped = spatial.warp(pair.moving, u)
    sim = losses.similarity(cfg.similarity)(warped, pair.fixed)
    loss, smooth = losses.paper_loss(sim, v, alpha)
    parts = {"similarity": sim.item(), "smoothness": smooth.mean().item(), "dice_loss": "", "field_error": ""}
    if use_dice and cfg.dice_weight > 0 and pair.moving_labels is not None and pair.fixed_labels is not None:
        classes = int(max(pair.moving_labels.max().item(), pair.fixed_labels.max().item())) + 1
        dl = losses.dice_loss(
            spatial.warp(one_hot(pair.moving_labels, classes), u), one_hot(pair.fixed_labels, classes)
        )
        loss = loss + cfg.dice_weight * dl
        parts["dice_loss"] = dl.item()
    if cfg.field_weight > 0 and pair.displacement is not None:
        error = end_point_error(u, pair.displacement)
        loss = loss + cfg.field_weight * error
        parts["field_error"] = error.item()
    return loss, parts


def end_point_error(u: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance (voxels) between two displacement fields ``(B, 3, D, H, W)``."""
    return torch.linalg.vector_norm(u - truth, dim=1).mean()


@torch.no_grad()
def validate(core: DTN, pairs: list, alpha: float, amp: bool) -> dict:
    """Mean Dice (warped moving labels vs fixed labels), folding % and SDlogJ over the validation pairs, of the
    symmetric velocity that the pipeline uses (``DTN.symmetric_velocity``)."""
    dices, folds, sdlj = [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    for _, pair in pairs:
        with autocast:
            v = core.symmetric_velocity(pair.moving, pair.fixed, alpha)
        u = core.displacement(v.float(), tuple(pair.fixed.shape[2:]))
        jac = metrics.jacobian_determinant(u[0].cpu().numpy())
        folds.append(metrics.folding(jac)[1])
        sdlj.append(metrics.sd_log_jacobian(jac))
        if pair.moving_labels is not None and pair.fixed_labels is not None:
            warped = spatial.warp(pair.moving_labels, u, mode="nearest")
            dices.append(metrics.mean_dice(warped.cpu().numpy(), pair.fixed_labels.cpu().numpy()))
    return {"val_dice": _mean(dices), "val_folding_percent": _mean(folds), "val_sd_log_jacobian": _mean(sdlj)}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


__all__ = ["compute_loss", "end_point_error", "one_hot", "sample_alpha", "validate"]
