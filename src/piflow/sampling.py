"""Few-step sampling: the FlowMapSDE scheduler (algorithm.md §5.1) and the policy sampling loop (§5.2).

Each step evaluates the student once at (x, σ_i), rolls its policy out to σ_dst,i and lets the scheduler map the
result to the next grid point (identity for h = 0). Any NFE ≥ 1 works at test time (elastic inference).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from piflow.piid import check_nfe, segment_grid
from piflow.policies.base import Policy, check_finite, draw
from piflow.policies.gmflow import GMFlowPolicy
from piflow.progress import progress_bar
from piflow.rollout import DEFAULT_TOTAL_SUBSTEPS, rollout
from piflow.timewarp import warp

HLike = Union[float, str]


def auto_temperature(nfe: int) -> float:
    """The pipelines' 'auto' GM temperature: clamp(0.1·(nfe − 1), 0, 1)."""
    return min(max(0.1 * (nfe - 1), 0.0), 1.0)


def resolve_temperature(temperature: Union[float, str], nfe: int) -> float:
    """The GM temperature to use at `nfe` steps: a number >= 0 as given, or 'auto' (`auto_temperature`); anything
    else (negative, NaN, another string) is a ValueError naming the argument."""
    if temperature == "auto":
        return auto_temperature(nfe)
    if isinstance(temperature, str) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number >= 0 or 'auto', got {temperature!r}")
    value = float(temperature)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"temperature must be a finite number >= 0 or 'auto', got {temperature!r}")
    return value


class FlowMapSDEScheduler:
    """Step schedule of a few-step policy sampler.

    Args:
        shift: time warp m (σ = warp(τ)).
        final_step_size_scale: f, the last step's raw length relative to the others (0.5 for FLUX/Qwen).
        h: stochasticity; 0 = deterministic flow map (identity step), 'inf' = roll out to σ = 0 then re-noise,
           in between an SDE with the same marginals.
        num_train_timesteps: S_t, the factor between σ and the network timestep (`timesteps = σ·S_t`).
    After `set_timesteps(nfe)`: `sigmas` (nfe + 1,) ending with 0, `sigmas_dst` (nfe,) where each step's rollout
    stops, `timesteps` = sigmas[:-1]·S_t, `timesteps_dst`.
    """

    def __init__(self, shift: float = 1.0, final_step_size_scale: float = 1.0, h: HLike = 0.0,
                 num_train_timesteps: float = 1000.0, eps: float = 1e-6):
        if isinstance(h, str):
            if h != "inf":
                raise ValueError(f"h must be a number >= 0 or 'inf', got {h!r}")
        elif not (h >= 0 and not math.isnan(h)):
            raise ValueError(f"h must be a number >= 0 or 'inf', got {h!r}")
        self.shift = float(shift)
        warp(0.5, self.shift)  # validates shift
        self.final_step_size_scale = float(final_step_size_scale)
        self.h = h
        self.num_train_timesteps = float(num_train_timesteps)
        self.eps = eps
        self.num_inference_steps: Optional[int] = None

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = "cpu") -> None:
        nfe = check_nfe(num_inference_steps)
        raw = torch.tensor(segment_grid(nfe, self.final_step_size_scale), dtype=torch.float64)
        sigmas = torch.cat([warp(raw, self.shift), raw.new_zeros(1)])
        sigma_src, sigma_to = sigmas[:-1], sigmas[1:]
        alpha_src, alpha_to = 1 - sigma_src, 1 - sigma_to
        if self.h == "inf":
            m = torch.zeros_like(sigma_to)
        elif float(self.h) == 0.0:
            m = torch.ones_like(sigma_to)
        else:
            ratio = sigma_to * alpha_src / (sigma_src * alpha_to).clamp(min=self.eps)
            m = ratio.clamp(min=0) ** (float(self.h) ** 2)
        sigmas_dst = sigma_to * m / (alpha_to + sigma_to * m).clamp(min=self.eps)
        self.num_inference_steps = nfe
        self.sigmas = sigmas.float().to(device)
        self.sigmas_dst = sigmas_dst.float().to(device)
        self.m = m.float().to(device)
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps
        self.timesteps_dst = self.sigmas_dst * self.num_train_timesteps

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(nfe) before step()")

    def step(self, x_dst: Tensor, step_index: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Map the rolled-out state x_dst (at sigmas_dst[i]) to the next grid point sigmas[i + 1]."""
        self._require_timesteps()
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"step_index must lie in [0, {self.num_inference_steps}), got {step_index}")
        m = float(self.m[step_index])
        sigma_to = float(self.sigmas[step_index + 1])
        if m == 1.0:
            return x_dst
        x = (1 - sigma_to + sigma_to * m) * x_dst.float()
        noise_scale = sigma_to * math.sqrt(max(1 - m * m, 0.0))
        if noise_scale > 0:
            noise = draw("normal", x.shape, generator, x.device, torch.float32)
            x = x + noise_scale * noise
        return x.to(x_dst.dtype)


def sample(student: Callable[[Tensor, Tensor, Any], Policy], noise: Tensor, nfe: int, cond: Any = None, *,
           shift: float = 1.0, final_step_size_scale: float = 1.0, h: HLike = 0.0,
           temperature: Union[float, str] = 1.0, total_substeps: int = DEFAULT_TOTAL_SUBSTEPS,
           generator: Optional[torch.Generator] = None, return_trajectory: bool = False, progress: bool = False):
    """Sample with a policy student in `nfe` network evaluations.

    Args:
        student: ``student(x, sigma (B,), cond) -> Policy``.
        noise: (B, C, *spatial) initial noise at σ = 1.
        temperature: GM temperature on non-final steps (a number >= 0, or 'auto' = clamp(0.1·(nfe − 1), 0, 1)).
    Returns x at σ = 0 (dtype of `noise`), or (x, [states at every grid point]) with `return_trajectory`.
    """
    check_finite(noise, "noise")
    scheduler = FlowMapSDEScheduler(shift, final_step_size_scale, h)
    scheduler.set_timesteps(nfe, device=noise.device)
    temperature = resolve_temperature(temperature, scheduler.num_inference_steps)
    x = noise
    batch = noise.shape[0]
    trajectory = [x]
    bar = progress_bar(scheduler.num_inference_steps, "sampling", enabled=progress)
    for i in range(scheduler.num_inference_steps):
        sigma_src = scheduler.sigmas[i].expand(batch)
        policy = student(x, sigma_src, cond)
        if isinstance(policy, GMFlowPolicy) and i < scheduler.num_inference_steps - 1:
            policy = policy.temperature(float(temperature))
        x_dst = rollout(policy, x, sigma_src, scheduler.sigmas_dst[i].expand(batch), total_substeps, shift)
        x = scheduler.step(x_dst, i, generator)
        trajectory.append(x)
        bar.update(1)
    bar.close()
    return (x, trajectory) if return_trajectory else x


def _sigma_grid(num_steps: int, shift: float, device) -> Tensor:
    check_nfe(num_steps)
    return warp(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).to(device)


@torch.no_grad()
def euler_sample(teacher: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, num_steps: int, cond: Any = None,
                 shift: float = 1.0) -> Tensor:
    """The teacher's own Euler ODE sampler: `num_steps` evaluations, uniform in raw time."""
    sigmas = _sigma_grid(num_steps, shift, noise.device)
    x = noise
    batch = noise.shape[0]
    for i in range(num_steps):
        sigma = sigmas[i].to(torch.float32).expand(batch)
        x = x + teacher(x, sigma, cond).to(x.dtype) * float(sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def rk4_sample(teacher: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, num_steps: int, cond: Any = None,
               shift: float = 1.0) -> Tensor:
    """Classical RK4 on dx/dσ = u (4 evaluations per step): a high-accuracy reference for the teacher ODE."""
    sigmas = _sigma_grid(num_steps, shift, noise.device)
    x = noise
    batch = noise.shape[0]

    def velocity(state: Tensor, sigma: float) -> Tensor:
        return teacher(state, torch.full((batch,), sigma, dtype=state.dtype, device=state.device), cond).to(
            state.dtype)

    for i in range(num_steps):
        s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
        step = s1 - s0
        k1 = velocity(x, s0)
        k2 = velocity(x + 0.5 * step * k1, s0 + 0.5 * step)
        k3 = velocity(x + 0.5 * step * k2, s0 + 0.5 * step)
        k4 = velocity(x + step * k3, s1)
        x = x + step / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
