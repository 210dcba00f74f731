"""The teachers' training objectives, written once for every recipe that trains a teacher: rectified-flow matching
(algorithm.md §1.1, §7.1; the default) or denoising diffusion on a discrete VP schedule with ε-, v- or x0-prediction
(§15), whose networks become π-Flow teachers through `piflow.diffusion.DiffusionTeacher`.

A recipe's ``objective`` config section selects it (`piflow.config.OBJECTIVE_DEFAULTS`): ``prediction_type: flow``
or one of epsilon / v_prediction / sample with the schedule keys of a diffusers scheduler config
(num_train_timesteps, beta_schedule, beta_start, beta_end, rescale_betas_zero_snr)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from piflow.diffusion import DiffusionTeacher, DiscreteVPSchedule
from piflow.errors import ConfigError
from piflow.piid import forward_diffuse
from piflow.teachers import NetworkTeacher
from piflow.timewarp import NUM_TIMESTEPS

TIME_SAMPLINGS = ("uniform", "logit_normal")
OBJECTIVES = ("flow", "epsilon", "v_prediction", "sample")


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


def diffusion_conversion(objective: Mapping[str, Any]) -> Optional[DiffusionTeacher]:
    """None for ``prediction_type: flow``; else the network-free `DiffusionTeacher` conversion of the objective's
    schedule and prediction type. A bad value is a one-line `ConfigError` naming ``objective``."""
    kind = objective.get("prediction_type", "flow")
    if kind not in OBJECTIVES:
        raise ConfigError(f"objective.prediction_type must be one of {OBJECTIVES}, got {kind!r}")
    if kind == "flow":
        return None
    try:
        schedule = DiscreteVPSchedule.from_diffusers_config(dict(objective))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"objective: {error}") from None
    return DiffusionTeacher(None, schedule, kind)


def denoising_loss(model: Callable[[Tensor, Tensor, Any], Tensor], x0: Tensor, cond: Any,
                   conversion: DiffusionTeacher, time_sampling: str, generator: torch.Generator) -> Tensor:
    """MSE between ``model(x_t, t, cond)`` and the conversion's target (ε, v or x0) at x_t = α_t·x0 + s_t·ε, with
    ε ~ N(0, I) and the timestep t = t_max·u, u ~ `time_sampling` on [0, 1] (uniform: DDPM's uniform timesteps;
    continuous, since π-Flow queries fractional timesteps), drawn in that order from `generator`."""
    noise = torch.randn(x0.shape, generator=generator)
    schedule = conversion.schedule
    fraction = sample_time(x0.shape[0], time_sampling, generator).to(torch.float64)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * fraction
    x_in, t_in, target = conversion.training_example(x0, noise, t)
    out = model(x_in.to(x0.dtype), t_in, cond)
    return (out.float() - target).square().mean()


def teacher_loss(model: Callable[[Tensor, Tensor, Any], Tensor], x0: Tensor, cond: Any, time_sampling: str,
                 generator: torch.Generator, conversion: Optional[DiffusionTeacher] = None) -> Tensor:
    """The teacher objective of a recipe: `flow_matching_loss` (conversion None) or `denoising_loss`."""
    if conversion is None:
        return flow_matching_loss(model, x0, cond, time_sampling, generator, NUM_TIMESTEPS)
    return denoising_loss(model, x0, cond, conversion, time_sampling, generator)


def network_teacher(model: Callable[..., Tensor], conversion: Optional[DiffusionTeacher] = None):
    """A trained teacher network as ``teacher(x_σ, σ, cond) -> u``: a `NetworkTeacher` (flow objective) or the
    conversion around it (`DiffusionTeacher`)."""
    if conversion is None:
        return NetworkTeacher(model, NUM_TIMESTEPS)
    return conversion.with_model(model)
