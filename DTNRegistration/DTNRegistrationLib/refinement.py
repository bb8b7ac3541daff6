"""Test-time optimisation: refine the network's velocity field on one pair with the training objective."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import losses, metrics, spatial


def objective(
    v: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    alpha: float,
    similarity: str = "l1",
    mask: torch.Tensor | None = None,
    integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS,
) -> torch.Tensor:
    """``similarity(moving o exp(v), fixed) + alpha * ||grad v||^2``, with ``v`` on its own (coarser) grid."""
    u = spatial.resize_field(spatial.integrate(v, integration_steps), tuple(fixed.shape[2:]))
    return losses.similarity(similarity)(spatial.warp(moving, u), fixed, mask=mask) + alpha * (
        losses.gradient_smoothness(v)
    )


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
    alpha: float,
    similarity: str = "l1",
    mask: torch.Tensor | None = None,
    integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS,
) -> tuple[torch.Tensor, str]:
    """The network's velocity, or zero when no deformation scores better on :func:`objective` or the field folds.

    A safeguard: a model that does not suit this pair's images never makes the result worse, on the pair's own
    objective, than the affine initialisation alone, nor hands refinement a folded map to start from. Returns the
    field and ``"network"``, ``"identity"`` or ``"identity (network field folds)"``.
    """
    zero = torch.zeros_like(velocity)
    with torch.no_grad():
        network = float(objective(velocity, moving, fixed, alpha, similarity, mask, integration_steps))
        identity = float(objective(zero, moving, fixed, alpha, similarity, mask, integration_steps))
    if network > identity:
        return zero, "identity"
    if folding_percent(velocity, integration_steps) > MAX_START_FOLDING_PERCENT:
        return zero, "identity (network field folds)"
    return velocity, "network"


def refine_velocity(
    velocity: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    alpha: float,
    steps: int,
    similarity: str = "l1",
    mask: torch.Tensor | None = None,
    integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS,
    learning_rate: float = 0.05,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Minimise :func:`objective` over ``v`` by Adam (voxel units), starting from ``velocity``.

    ``on_step(step, loss)`` runs after every step (progress; cancel by raising).
    """
    v = velocity.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=learning_rate)
    for step in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss = objective(v, moving, fixed, alpha, similarity, mask, integration_steps)
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return v.detach()
