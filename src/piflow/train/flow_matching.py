"""Rectified-flow matching, the teachers' training objective (algorithm.md §1.1, §7.1): written once for every
recipe that trains a teacher."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from piflow.errors import ConfigError
from piflow.piid import forward_diffuse
from piflow.timewarp import NUM_TIMESTEPS

TIME_SAMPLINGS = ("uniform", "logit_normal")


def check_time_sampling(mode: str) -> str:
    """`mode` if it is one of `TIME_SAMPLINGS`, else a `ConfigError` naming the config key."""
    if mode not in TIME_SAMPLINGS:
        raise ConfigError(f"flow_matching.time_sampling must be one of {TIME_SAMPLINGS}, got {mode!r}")
    return mode


def sample_time(batch: int, mode: str, generator: torch.Generator) -> Tensor:
    """Training noise levels σ (B,): uniform on [0, 1] or logit-normal (sigmoid of a standard normal)."""
    check_time_sampling(mode)
    if mode == "uniform":
        return torch.rand(batch, generator=generator)
    return torch.sigmoid(torch.randn(batch, generator=generator))


def flow_matching_loss(velocity: Callable[[Tensor, Tensor, Any], Tensor], x0: Tensor, cond: Any, time_sampling: str,
                       generator: torch.Generator, num_timesteps: float = NUM_TIMESTEPS) -> Tensor:
    """MSE between ``velocity(x_σ, σ·num_timesteps, cond)`` and the rectified-flow target u = ε − x0, at
    x_σ = (1 − σ)·x0 + σ·ε with ε ~ N(0, I) and σ ~ `time_sampling` (drawn in that order from `generator`)."""
    noise = torch.randn(x0.shape, generator=generator)
    sigma = sample_time(x0.shape[0], time_sampling, generator)
    u = velocity(forward_diffuse(x0, sigma, noise), sigma * num_timesteps, cond)
    return (u.float() - (noise - x0)).square().mean()
