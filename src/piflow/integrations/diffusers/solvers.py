"""Baselines: sample a piflow teacher with diffusers' multistep solvers in their flow-matching settings.

Requires the optional extra ``pip install 'piflow[diffusers]'``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from piflow.timewarp import NUM_TIMESTEPS

SOLVERS = ("flow-euler", "dpm-solver++", "unipc")


def make_flow_scheduler(name: str, shift: float = 1.0, num_train_timesteps: int = int(NUM_TIMESTEPS)):
    """A diffusers scheduler configured for rectified-flow velocity models (σ = t/1000, u = ε − x0)."""
    try:
        import diffusers
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError("diffusers baselines need `pip install 'piflow[diffusers]'`") from error
    if name == "flow-euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    common = dict(num_train_timesteps=num_train_timesteps, use_flow_sigmas=True, prediction_type="flow_prediction",
                  flow_shift=shift)
    if name == "dpm-solver++":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(solver_order=2, **common)
    raise ValueError(f"unknown solver {name!r}; expected one of {SOLVERS}")


@torch.no_grad()
def diffusers_sample(teacher: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, num_steps: int,
                     cond: Any = None, solver: str = "dpm-solver++", shift: float = 1.0) -> Tensor:
    """Sample with `num_steps` teacher evaluations using a diffusers solver; the teacher sees σ = scheduler.sigmas."""
    scheduler = make_flow_scheduler(solver, shift)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise.float()
    batch = noise.shape[0]
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].to(torch.float32).expand(batch)
        velocity = teacher(x, sigma, cond).float()
        x = scheduler.step(velocity, timestep, x).prev_sample
    return x.to(noise.dtype)
