"""Test-time optimisation: refine the network's velocity field on one pair with the training objective."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import losses, spatial


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
    """Minimise ``similarity(moving o exp(v), fixed) + alpha * ||grad v||^2`` over ``v``, starting from ``velocity``.

    ``velocity`` may be coarser than the images (the network's half-resolution output); the field is
    optimised on its own grid and upsampled for warping, as in the network. Adam in voxel units.
    ``on_step(step, loss)`` is called after every step (progress, and cancel by raising).
    """
    sim = losses.similarity(similarity)
    v = velocity.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=learning_rate)
    shape = tuple(fixed.shape[2:])
    for step in range(steps):
        optimiser.zero_grad(set_to_none=True)
        u = spatial.resize_field(spatial.integrate(v, integration_steps), shape)
        warped = spatial.warp(moving, u)
        loss = sim(warped, fixed, mask=mask) + alpha * losses.gradient_smoothness(v)
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return v.detach()
