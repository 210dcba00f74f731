"""Few-step sampling: the FlowMapSDE step schedule (algorithm.md §5.1), the one policy sampling loop (§5.2) and
the teacher's own ODE samplers (Euler, RK4, the Euler trajectory recorder) used as references and baselines.

Each step evaluates the student once at (x, σ_i), rolls its policy out to σ_dst,i and lets the schedule map the
result to the next grid point (identity for h = 0). Any NFE ≥ 1 works at test time (elastic inference). The diffusers
pipelines run this same loop (`sample`) with their scheduler's schedule.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from piflow.checks import check_finite, draw
from piflow.policies.base import Policy
from piflow.progress import progress_bar
from piflow.rollout import DEFAULT_TOTAL_SUBSTEPS, rollout
from piflow.schedule import check_nfe, check_raw_times, resolve_temperature, segment_grid
from piflow.timewarp import NUM_TIMESTEPS, unwarp, warp

HLike = Union[float, str]
PolicyFn = Callable[[Tensor, Tensor, Any], Policy]


class FlowMapSDESchedule:
    """Step schedule of a few-step policy sampler (the math behind the diffusers `FlowMapSDEScheduler`).

    Args:
        shift: time warp m (σ = warp(τ)).
        final_step_size_scale: f, the last step's raw length relative to the others (0.5 for FLUX/Qwen).
        h: stochasticity; 0 = deterministic flow map (identity step), 'inf' = roll out to σ = 0 then re-noise,
           in between an SDE with the same marginals.
        num_train_timesteps: S_t, the factor between σ and the network timestep (`timesteps = σ·S_t`).
    After `set_timesteps(nfe)` or `set_timesteps(sigmas=[…])`: `sigmas` (nfe + 1,) ending with 0, `sigmas_dst`
    (nfe,) where each step's rollout stops, `timesteps` = sigmas[:-1]·S_t, `timesteps_dst`.
    """

    def __init__(self, shift: float = 1.0, final_step_size_scale: float = 1.0, h: HLike = 0.0,
                 num_train_timesteps: float = NUM_TIMESTEPS, eps: float = 1e-6):
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

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                      sigmas: Optional[Sequence[float]] = None) -> None:
        """The grid of `num_inference_steps` steps (raw segment starts 1, …, f·base, warped by `shift`), or of an
        explicit list `sigmas` of raw times (strictly decreasing in (0, 1], warped by `shift` like the authors'
        sampler; a final 0 is appended; `num_inference_steps`, if given, must equal its length)."""
        if sigmas is not None:
            raw_list = check_raw_times(sigmas)
            if num_inference_steps is not None and check_nfe(num_inference_steps) != len(raw_list):
                raise ValueError(f"num_inference_steps ({num_inference_steps}) must equal len(sigmas) "
                                 f"({len(raw_list)})")
        elif num_inference_steps is None:
            raise ValueError("give num_inference_steps or sigmas")
        else:
            raw_list = segment_grid(check_nfe(num_inference_steps), self.final_step_size_scale)
        nfe = len(raw_list)
        raw = torch.tensor(raw_list, dtype=torch.float64)
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


def sample(policy_fn: PolicyFn, noise: Tensor, nfe: Optional[int] = None, cond: Any = None, *,
           sigmas: Optional[Sequence[float]] = None, shift: float = 1.0, final_step_size_scale: float = 1.0,
           h: HLike = 0.0, schedule: Optional[FlowMapSDESchedule] = None, temperature: Union[float, str] = 1.0,
           total_substeps: int = DEFAULT_TOTAL_SUBSTEPS, generator: Optional[torch.Generator] = None,
           on_step: Optional[Callable[[int, Tensor], Optional[Tensor]]] = None, return_trajectory: bool = False,
           progress: bool = False, init: Optional[Tensor] = None):
    """Sample with a policy student in `nfe` network evaluations (the only few-step loop in piflow).

    Args:
        policy_fn: ``policy_fn(x, sigma (B,), cond) -> Policy``: one student evaluation turned into its policy
            (e.g. `PiFlow.policy`, or a pipeline's student + `policy_from_outputs`).
        noise: (B, C, *spatial) Gaussian noise ε. The start state is σ_0·ε (ε itself for the default σ_0 = 1), or
            with `init` (clean data x0 of the same shape: image-to-image) the forward-diffused (1 − σ_0)·x0 + σ_0·ε.
        nfe / sigmas: the number of steps of the default grid, or an explicit list of raw times (see
            `FlowMapSDESchedule.set_timesteps`). `shift`, `final_step_size_scale`, `h` build the schedule, unless
            `schedule` (a `FlowMapSDESchedule` after `set_timesteps`, e.g. a pipeline's with dynamic shift) is given.
        temperature: GM temperature on non-final steps (a number >= 0, or 'auto' = clamp(0.1·(nfe − 1), 0, 1)).
        on_step: called as ``on_step(i, x)`` after step i; a returned tensor replaces x (diffusers callbacks).
    Returns x at σ = 0 in the dtype of `noise`, or (x, [states at every grid point]) with `return_trajectory`.
    With a `schedule`, `shift`, `final_step_size_scale` and `h` are the schedule's (the arguments are not used).
    """
    check_finite(noise, "noise")
    if schedule is None:
        schedule = FlowMapSDESchedule(shift, final_step_size_scale, h)
        schedule.set_timesteps(nfe, device=noise.device, sigmas=sigmas)
    elif schedule.num_inference_steps is None:
        raise ValueError("schedule: call set_timesteps before passing it to sample")
    elif nfe is not None or sigmas is not None:
        raise ValueError("give nfe/sigmas or a schedule (whose set_timesteps fixed its steps), not both")
    steps = schedule.num_inference_steps
    temperature = resolve_temperature(temperature, steps)
    batch = noise.shape[0]
    start = float(schedule.sigmas[0])
    x = noise if start == 1.0 else noise * start
    if init is not None:
        if init.shape != noise.shape:
            raise ValueError(f"init must have the shape of noise {tuple(noise.shape)}, got {tuple(init.shape)}")
        check_finite(init, "init")
        x = x + (1.0 - start) * init.to(noise.dtype)
    trajectory = [x]
    bar = progress_bar(steps, "sampling", enabled=progress)
    for i in range(steps):
        sigma_src = schedule.sigmas[i].expand(batch)
        policy = policy_fn(x, sigma_src, cond)
        if i < steps - 1:
            policy = policy.temperature(temperature)
        x_dst = rollout(policy, x, sigma_src, schedule.sigmas_dst[i].expand(batch), total_substeps, schedule.shift)
        x = schedule.step(x_dst, i, generator)
        if on_step is not None:
            replaced = on_step(i, x)
            x = x if replaced is None else replaced
        trajectory.append(x)
        bar.update(1)
    bar.close()
    return (x, trajectory) if return_trajectory else x


def _sigma_grid(num_steps: int, shift: float, device, sigma_start: float = 1.0) -> Tensor:
    """σ from `sigma_start` to 0 in `num_steps` steps uniform in raw time: (num_steps + 1,) float64."""
    check_nfe(num_steps)
    if not 0.0 < sigma_start <= 1.0:
        raise ValueError(f"sigma_start must be in (0, 1], got {sigma_start}")
    raw_start = float(unwarp(float(sigma_start), shift))
    return warp(torch.linspace(raw_start, 0.0, num_steps + 1, dtype=torch.float64), shift).to(device)


def _euler_states(teacher: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, num_steps: int, cond: Any,
                  shift: float, sigma_start: float = 1.0):
    """The teacher's Euler ODE states at σ_0 = `sigma_start`, σ_1, …, σ_n = 0 (uniform in raw time), one at a time;
    `noise` is the state at σ_0."""
    sigmas = _sigma_grid(num_steps, shift, noise.device, sigma_start)
    x = noise
    batch = noise.shape[0]
    yield x
    for i in range(num_steps):
        sigma = sigmas[i].to(torch.float32).expand(batch)
        x = x + teacher(x, sigma, cond).to(x.dtype) * float(sigmas[i + 1] - sigmas[i])
        yield x


@torch.no_grad()
def euler_sample(teacher: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, num_steps: int, cond: Any = None,
                 shift: float = 1.0, sigma_start: float = 1.0) -> Tensor:
    """The teacher's own Euler ODE sampler: `num_steps` evaluations, uniform in raw time. With `sigma_start` < 1,
    `noise` is a state at that σ (B, …) and the ODE runs from there to σ = 0."""
    for x in _euler_states(teacher, noise, num_steps, cond, shift, sigma_start):
        pass
    return x


@torch.no_grad()
def euler_trajectory(teacher: Callable[[Tensor, Tensor, Any], Tensor], noise: Tensor, num_steps: int,
                     cond: Any = None, shift: float = 1.0, batch_size: Optional[int] = None) -> Tensor:
    """Every state of `euler_sample`: (num_steps + 1, B, C, *spatial), σ from 1 to 0. With `batch_size`, the noise
    (and a tensor `cond` along with it) is run in chunks of that many samples."""
    step = noise.shape[0] if batch_size is None else batch_size
    chunks = []
    for start in range(0, noise.shape[0], step):
        part = cond[start:start + step] if torch.is_tensor(cond) else cond
        chunks.append(torch.stack(list(_euler_states(teacher, noise[start:start + step], num_steps, part, shift))))
    return torch.cat(chunks, dim=1)


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
