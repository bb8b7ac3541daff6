"""Test-time optimisation: refine the network's velocity field on one pair, coarse to fine.

The objective is the training one (``losses.registration_objective``: similarity of the warped moving image to the
fixed one, plus alpha ||grad v||^2). A schedule is a list of levels, each an image spacing with its own steps, NCC
window and velocity grid; the velocity found so far is kept at the finest resolution reached, and each level
optimises a correction on its own grid (coarse levels move the anatomy far and cheaply, fine ones add the detail).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.adam import adam

from . import losses, metrics, spatial


@dataclass(frozen=True)
class RefineLevel:
    """One level of a schedule: images at ``spacing_mm``, the velocity correction on a grid ``velocity_factor``
    times coarser, ``steps`` Adam steps of ``learning_rate`` (voxels of the velocity grid) with an NCC window of
    ``window`` voxels of the level's images."""

    spacing_mm: float
    steps: int
    window: int = 5
    learning_rate: float = 0.1
    velocity_factor: int = 2


@dataclass(frozen=True)
class Schedule:
    """A refinement schedule; ``tolerance`` stops a level early once the objective's relative decrease over the
    last ``patience`` steps falls below it (0 = always run every step). ``smoothness`` multiplies the run's alpha
    in the NCC refinement objective (the network keeps the run's own alpha, the one it was trained with).
    ``step_floor``: Adam's steps shrink where the objective's derivative per voxel is below it (``AdamStepper``),
    so regions where the images already agree stay put; ``network_start``: False starts from the alignment alone.
    ``work_grid_passes``: further symmetric passes of a coarser network on the work grid before the levels
    (``WORK_GRID_PASSES``; DTN.symmetric_velocity)."""

    levels: tuple[RefineLevel, ...]
    tolerance: float = 0.0
    patience: int = 5
    smoothness: float = 1.0
    step_floor: float = 0.0
    network_start: bool = True
    work_grid_passes: int = 0

    def refinement_alpha(self, alpha: float, similarity: str = "ncc") -> float:
        """The weight of ||grad v||^2 in this schedule's objective for a run with ``alpha``. The smoothness was
        measured with NCC; NGF and MIND were tuned at the run's alpha (docs/cross-contrast.md) and keep it."""
        return alpha * self.smoothness if similarity == "ncc" else alpha

    def for_image_spacing(self, spacing_mm: float) -> Schedule:
        """The schedule without levels finer than the fixed image itself: a 1 mm level on 2 mm data has no more
        detail to find and fits interpolation noise (measured: 8x the folding of the same schedule without it)."""
        kept = tuple(level for level in self.levels if level.spacing_mm >= spacing_mm * 0.99 - 1e-6)
        if not kept:  # data coarser than every level: keep the coarsest
            kept = self.levels[:1]
        return dataclasses.replace(self, levels=kept)

    @property
    def steps(self) -> int:
        return sum(level.steps for level in self.levels)

    @property
    def spacings(self) -> list[float]:
        return [level.spacing_mm for level in self.levels]


# The network alone (no refinement) cascades: after its pass on its own grid, this many further symmetric passes
# on the work grid, on the images warped half-way toward each other (DTN.symmetric_velocity; docs/model.md).
# Three passes against two: +0.005 Dice on the 1 mm development pairs (7 of 7 better), 5 % less error against
# known deformations (6 of 6), about 1 s more on a CPU; a fourth gained little more and roughened the field.
# The presets run none: after fast's 4 mm steps they gained +0.001 Dice for about 1 s. Two passes and 8 steps on
# the 2 mm grid instead of fast's levels scored +0.005 on the 1 mm pairs for 1.6 s more, and far less where the
# network does not carry the pair (a FLAIR -> T1 pair 0.690 against 0.779; docs/benchmarks.md, section 3).
WORK_GRID_PASSES = 3


def single_level(steps: int, spacing_mm: float, window: int = 9, learning_rate: float = 0.05) -> Schedule:
    """The one-level schedule of ``--refine N``: N steps on the work grid (the behaviour before schedules); with
    none, the network alone, with its work-grid passes."""
    passes = WORK_GRID_PASSES if steps == 0 else 0
    return Schedule((RefineLevel(spacing_mm, steps, window, learning_rate, 2),), work_grid_passes=passes)


# The presets, chosen by measurement on the development pairs (docs/benchmarks.md, refinement study): NCC windows of
# 5 voxels (the former 9 at 2 mm averaged over 18 mm), most steps where they are cheap (4 mm), few on the 2 mm grid;
# accurate adds 10 steps on a 1 mm grid. fast is sized for 10 s end to end on two cores: 30 + 8 steps scored 0.005
# higher on the 1 mm pairs but took about 1 s more. Tried and not kept: windows of 3, velocity grids as fine as the
# images, more 4 mm steps, smoothed gradients, normalised gradient descent instead of Adam, a smaller alpha.
# Smoothness (issue 17; docs/benchmarks.md, section 3): with the paper's alpha (0.1) the refined maps fit noise and
# intensity differences (SDlogJ 0.36 on the synthetic pairs, PICSL greedy's 0.19) and miss known deformations.
# Refinement alpha x3 (fast) and x10 (accurate): synthetic pairs +0.011 and +0.019, known 1 mm deformations
# +0.005 and +0.028, tissue-class pairs (labels that are intensity classes, so they reward the rougher fit)
# -0.002 and -0.012 to -0.03. x20, an NCC window of 7, more steps and an 8 mm level scored no higher.
_FAST_LEVELS = (RefineLevel(4.0, 25, 5, 0.2, 2), RefineLevel(2.0, 5, 5, 0.12, 2))
# longitudinal (same subject, another session; docs/benchmarks.md, section 8): fast's levels from the rigid alignment
# (no network: its field for a brain against itself moves it by 1.1 mm on average), with Adam's steps floored
# (step_floor): on the ICBM brain against a noisy rigid "rescan" of itself, 1.7 % of the brain changes volume by
# more than 10 % (fast 45.5 %, PICSL greedy 27.6 %), and a known local expansion is found as well as by fast (mean
# log det J 0.110 within 8 mm of its centre, fast 0.097, greedy 0.185; truth 0.199). Floors of 1 and 3 invented
# more and found no more; on fast itself the floor costs Dice between subjects (section 8).
PRESETS = {
    "fast": Schedule(_FAST_LEVELS, smoothness=3.0),
    "accurate": Schedule(
        (RefineLevel(4.0, 40, 5, 0.2, 2), RefineLevel(2.0, 20, 5, 0.1, 2), RefineLevel(1.0, 10, 5, 0.1, 2)),
        smoothness=10.0,
    ),
    "longitudinal": Schedule(_FAST_LEVELS, smoothness=3.0, step_floor=10.0, network_start=False),
}

# Weight of the folding penalty (losses.folding_penalty) in test-time refinement. With the paper's loss alone the
# fast preset folded on 0.04 % of a head-to-head pair's grid (outside the brain); weight 1: 0.012 %, 10: 0.005 % at
# the same Dice, 100: none but Dice -0.008 (docs/benchmarks.md, section 3). Training keeps the paper's loss.
FOLDING_WEIGHT = 10.0

# A network field folding on more than this share of its grid is not used (the goal for the result).
MAX_START_FOLDING_PERCENT = 0.01


def folding_percent(velocity: torch.Tensor, integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS) -> float:
    """Share (%) of the velocity grid's voxels where ``exp(v)`` folds (det J <= 0)."""
    with torch.no_grad():
        u = spatial.integrate(velocity.float(), integration_steps)
    return metrics.folding(metrics.jacobian_determinant(u[0].cpu().numpy()))[1]


def better_start(
    velocity: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    *,
    alpha: float,
    similarity: str = "ncc",
    mask: torch.Tensor | None = None,
    integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS,
    moving_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str]:
    """The network's velocity, or zero when no deformation scores better on the objective or the field folds.

    A safeguard: a model that does not suit this pair's images never makes the result worse, on the pair's own
    objective, than the affine initialisation alone, nor hands refinement a folded map to start from. Returns the
    field and ``"network"``, ``"identity"`` or ``"identity (network field folds)"``.
    """
    zero = torch.zeros_like(velocity)
    moving, fixed, stats = losses.prepare_similarity(similarity, moving, fixed, moving_mask=moving_mask)
    options = dict(
        similarity=similarity,
        mask=mask,
        integration_steps=integration_steps,
        fixed_stats=stats,
        moving_mask=moving_mask,
    )
    with torch.no_grad():
        network = float(losses.registration_objective(velocity, moving, fixed, alpha=alpha, **options))
        identity = float(losses.registration_objective(zero, moving, fixed, alpha=alpha, **options))
    if network > identity:
        return zero, "identity"
    if folding_percent(velocity, integration_steps) > MAX_START_FOLDING_PERCENT:
        return zero, "identity (network field folds)"
    return velocity, "network"


def _pool_mask(mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
    if mask is None or tuple(mask.shape[2:]) == tuple(shape):
        return mask
    return (F.interpolate(mask.float(), size=tuple(shape), mode="trilinear", align_corners=False) > 0.5).float()


def velocity_shape(image_shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """The velocity grid ``factor`` times coarser than an image grid (at least 2 voxels along each axis)."""
    return tuple(max(2, n // factor) for n in image_shape)


def refine_schedule(
    velocity: torch.Tensor,
    pyramid: Sequence[tuple[torch.Tensor, torch.Tensor]],
    schedule: Schedule,
    *,
    alpha: float,
    similarity: str = "ncc",
    mask: torch.Tensor | None = None,
    integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS,
    on_step: Callable[[int, int, float], None] | None = None,
    moving_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Refine ``velocity`` level by level; ``pyramid[i]`` is the (moving, fixed) pair of ``schedule.levels[i]``.

    The running velocity keeps the finest grid it has reached: each level optimises a correction ``dv`` on its own
    velocity grid, the objective sees ``resize(v) + dv``, and the correction is then added back at ``v``'s grid.
    ``on_step(done, total, loss)`` runs after every step (progress; cancel by raising). Returns the velocity and the
    steps each level took (fewer than scheduled where the tolerance stopped it).
    """
    v = velocity.detach()
    total, done, taken = schedule.steps, 0, []
    for level, (moving, fixed) in zip(schedule.levels, pyramid):
        grid = velocity_shape(fixed.shape[2:], level.velocity_factor)
        if tuple(v.shape[2:]) != grid and v.shape[2] < grid[0]:  # a finer level: the running field moves up
            v = spatial.resize_field(v, grid)
        base = spatial.resize_field(v, grid)
        dv = torch.zeros_like(base, requires_grad=True)
        optimiser = AdamStepper(dv, level.learning_rate, schedule.step_floor)
        level_mask = _pool_mask(mask, fixed.shape[2:])
        level_moving_mask = _pool_mask(moving_mask, fixed.shape[2:])
        moving, fixed, stats = losses.prepare_similarity(similarity, moving, fixed, level.window, level_moving_mask)
        history: list[float] = []
        steps = 0
        for _ in range(level.steps):
            dv.grad = None
            loss = losses.registration_objective(
                base + dv,
                moving,
                fixed,
                alpha=alpha,
                similarity=similarity,
                window=level.window,
                mask=level_mask,
                integration_steps=integration_steps,
                fixed_stats=stats,
                moving_mask=level_moving_mask,
                folding_weight=FOLDING_WEIGHT,
            )
            loss.backward()
            optimiser.step()
            steps += 1
            done += 1
            history.append(float(loss.detach()))
            if on_step is not None:
                on_step(done, total, history[-1])
            if _converged(history, schedule.tolerance, schedule.patience):
                break
        done += level.steps - steps
        taken.append(steps)
        v = v + spatial.resize_field(dv.detach(), tuple(v.shape[2:]))
    return v, taken


class AdamStepper:
    """torch's Adam (default betas) on one tensor, through its functional form.

    ``torch.optim.Adam`` imports torch._dynamo and sympy on construction: about 1 s of a 10 s registration on two
    cores (measured 2026-11-30); the functional ``torch.optim.adam.adam`` computes the same update without them.
    Adam normalises each value's step, so a near-zero gradient still makes a full step. The objective is a mean
    over voxels: a value's gradient times their number is the derivative per voxel, and an epsilon of
    ``floor / numel`` makes steps small where that is below ``floor`` (0: torch's default epsilon).
    """

    def __init__(self, parameter: torch.Tensor, learning_rate: float, floor: float = 0.0) -> None:
        self.parameter, self.learning_rate = parameter, learning_rate
        self.eps = max(1e-8, floor / parameter.numel())
        self.exp_avg = torch.zeros_like(parameter)
        self.exp_avg_sq = torch.zeros_like(parameter)
        self.step_count = torch.tensor(0.0)

    @torch.no_grad()
    def step(self) -> None:
        adam(
            [self.parameter],
            [self.parameter.grad],
            [self.exp_avg],
            [self.exp_avg_sq],
            [],
            [self.step_count],
            foreach=False,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=self.learning_rate,
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
        )


def _converged(history: list[float], tolerance: float, patience: int) -> bool:
    """The objective fell by less than ``tolerance`` (relative) over the last ``patience`` steps."""
    if tolerance <= 0 or len(history) <= patience:
        return False
    before, now = history[-1 - patience], history[-1]
    return (before - now) < tolerance * abs(before)


def refine_velocity(
    velocity: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    *,
    alpha: float,
    steps: int,
    similarity: str = "ncc",
    window: int = 9,
    mask: torch.Tensor | None = None,
    integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS,
    learning_rate: float = 0.05,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """``steps`` Adam steps on ``v`` itself (one level, on ``velocity``'s own grid); ``on_step(step, loss)``."""
    factor = max(1, round(fixed.shape[2] / velocity.shape[2]))
    level = RefineLevel(0.0, steps, window, learning_rate, factor)
    callback = None if on_step is None else (lambda done, total, loss: on_step(done - 1, loss))
    v, _ = refine_schedule(
        velocity,
        [(moving, fixed)],
        Schedule((level,)),
        alpha=alpha,
        similarity=similarity,
        mask=mask,
        integration_steps=integration_steps,
        on_step=callback,
    )
    return v
