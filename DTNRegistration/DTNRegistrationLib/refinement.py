"""Test-time optimisation: refine the network's velocity field on one pair with the training objective."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import losses, spatial


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
) -> tuple[torch.Tensor, str]:
    """Minimise :func:`objective` over ``v`` by Adam (voxel units), from the better of ``velocity`` and zero.

    Starting from zero when the network's prediction scores worse than no deformation keeps a model that
    does not suit this pair's images from steering the optimisation. Returns the field and its start
    (``"network"`` or ``"identity"``). ``on_step(step, loss)`` runs after every step (progress; cancel by raising).
    """

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        return objective(v, moving, fixed, alpha, similarity, mask, integration_steps)

    with torch.no_grad():
        zero = torch.zeros_like(velocity)
        start = "network" if float(loss_of(velocity)) <= float(loss_of(zero)) else "identity"
    v = (velocity if start == "network" else zero).detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=learning_rate)
    for step in range(steps):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_of(v)
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return v.detach(), start
