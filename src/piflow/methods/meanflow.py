"""MeanFlow (Geng et al., 2025): a network u_θ(z, r, t, cond) of the *average* velocity over [r, t], trained from
scratch with the MeanFlow identity and sampled in 1–2 steps.

Conventions are piflow's: t ∈ [0, 1] is the noise level σ, z_t = (1 − t)·x0 + t·ε, the velocity v = ε − x0 points
towards noise, and one step from t down to r is z_r = z_t − (t − r)·u(z_t, r, t). The identity

    u(z_t, r, t) = v(z_t, t) − (t − r)·d/dt u(z_t, r, t),   d/dt u = v·∂_z u + ∂_t u,

gives the regression target u_tgt = v − (t − r)·(v·∂_z u_θ + ∂_t u_θ) (stop-gradient), the total derivative being
one Jacobian-vector product of u_θ along (v, 0, 1) (`torch.func.jvp`). The loss is the adaptively weighted
‖u_θ − u_tgt‖²: w = 1/(‖Δ‖² + c)^p, detached. (t, r) are logit-normal draws, sorted so that t ≥ r, with r = t for
a share 1 − `ratio_r_not_t` of the batch (the plain flow-matching case, where u_tgt = v).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from piflow.checks import draw
from piflow.methods.base import FewStepSampler, Method
from piflow.models.embeddings import timestep_embedding
from piflow.piid import forward_diffuse
from piflow.policies import Policy
from piflow.timewarp import NUM_TIMESTEPS

# u_θ(z (B, C, *S), r (B,), t (B,), cond) -> u (B, C, *S)
AverageVelocityModel = Callable[[Tensor, Tensor, Tensor, Any], Tensor]
MEANFLOW_INITS = ("auto", "teacher", "scratch")


@dataclass(frozen=True)
class MeanFlowSettings:
    """The MeanFlow paper's ImageNet defaults: 25 % of pairs with r ≠ t, logit-normal(−0.4, 1) times, p = 1.
    init: the network's start, "teacher" (a copy of the teacher's network), "scratch" (a fresh backbone) or
    "auto" (the teacher's network when the teacher has a velocity network; a fresh one for the exact teacher and
    for diffusion-trained teachers, whose network predicts ε, v or x0)."""

    ratio_r_not_t: float = 0.25
    time_mu: float = -0.4
    time_sigma: float = 1.0
    adaptive_power: float = 1.0
    adaptive_eps: float = 1e-3
    init: str = "auto"

    def __post_init__(self):
        if self.init not in MEANFLOW_INITS:
            raise ValueError(f"init must be one of {list(MEANFLOW_INITS)}, got {self.init!r}")
        if not 0.0 <= self.ratio_r_not_t <= 1.0:
            raise ValueError(f"ratio_r_not_t must be in [0, 1], got {self.ratio_r_not_t}")
        if not self.time_sigma > 0:
            raise ValueError(f"time_sigma must be > 0, got {self.time_sigma}")
        if self.adaptive_power < 0 or not self.adaptive_eps > 0:
            raise ValueError(f"adaptive_power must be >= 0 and adaptive_eps > 0, got {self.adaptive_power}, "
                             f"{self.adaptive_eps}")


class AverageVelocityNet(nn.Module):
    """u_θ(z, r, t, cond) on a velocity backbone (a piflow `DiT` or `MLPVelocityModel2D`): the backbone sees
    t·S and, added to its conditioning (``extra_condition``), an MLP embedding of the interval (t − r)·S (the
    (t, t − r) conditioning of MeanFlow). The embedding's last layer starts at zero, so a backbone initialised
    from a teacher starts as u(z, r, t) = v_teacher(z, t), the right answer at r = t.

    Args:
        velocity_model: ``model(x, t·S, cond, extra_condition=(B, model.extra_condition_dim))``; owned as is.
        num_timesteps: S (the backbone's t scale). frequency_dim: sinusoid width of the interval embedding.
    """

    def __init__(self, velocity_model: nn.Module, num_timesteps: float = NUM_TIMESTEPS, frequency_dim: int = 256):
        super().__init__()
        width = getattr(velocity_model, "extra_condition_dim", None)
        if not isinstance(width, int):
            raise TypeError("velocity_model must take an extra_condition (expose extra_condition_dim): a piflow DiT "
                            "or MLPVelocityModel2D")
        self.velocity_model = velocity_model
        self.num_timesteps = float(num_timesteps)
        self.frequency_dim = int(frequency_dim)
        self.interval_embedder = nn.Sequential(nn.Linear(self.frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.interval_embedder[2].weight)
        nn.init.zeros_(self.interval_embedder[2].bias)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """z (B, C, *S), r and t (B,) noise levels with r ≤ t -> average velocity over [r, t], shape of z."""
        weight = self.interval_embedder[0].weight
        interval = timestep_embedding((t - r) * self.num_timesteps, self.frequency_dim).to(weight.dtype)
        return self.velocity_model(z, t * self.num_timesteps, cond, extra_condition=self.interval_embedder(interval))


def sample_times(batch: int, settings: MeanFlowSettings = MeanFlowSettings(),
                 generator: Optional[torch.Generator] = None, device=None,
                 dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(r, t), each (batch,), with 0 < r ≤ t < 1: two sorted logit-normal draws; r = t for a share
    1 − ratio_r_not_t of the batch."""
    normal = draw("normal", (2, batch), generator, device, dtype)
    pair = torch.sigmoid(settings.time_mu + settings.time_sigma * normal)
    t, r = pair.max(dim=0).values, pair.min(dim=0).values
    equal = draw("uniform", (batch,), generator, device) >= settings.ratio_r_not_t
    return torch.where(equal, t, r), t


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def meanflow_target(model: AverageVelocityModel, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                    cond: Any = None) -> Tensor:
    """u_tgt = v − (t − r)·(v·∂_z u + ∂_t u) at (z, r, t), without gradients (the stop-gradient target)."""
    def u_of(z_, r_, t_):
        return model(z_, r_, t_, cond)

    # The fused attention kernels have no forward-mode derivative; the math backend (matmul + softmax) has.
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        _, total_derivative = torch.func.jvp(u_of, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return v - _broadcast(t - r, v) * total_derivative


def meanflow_loss(model: AverageVelocityModel, x0: Tensor, cond: Any = None,
                  settings: MeanFlowSettings = MeanFlowSettings(), generator: Optional[torch.Generator] = None,
                  noise: Optional[Tensor] = None, times: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """The adaptively weighted MeanFlow loss on data x0 (B, C, *S): mean over the batch of sg(w)·‖u_θ − u_tgt‖²,
    w = 1/(‖u_θ − u_tgt‖² + c)^p (per sample, squared norm over all of its elements)."""
    if x0.dim() < 2:
        raise ValueError(f"x0 must have shape (B, C, *spatial), got {tuple(x0.shape)}")
    noise = draw("normal", tuple(x0.shape), generator, x0.device) if noise is None else noise
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    r, t = sample_times(x0.shape[0], settings, generator, x0.device, x0.dtype) if times is None else times
    z = forward_diffuse(x0, t, noise)
    v = noise - x0
    target = meanflow_target(model, z, r, t, v, cond)
    error = (model(z, r, t, cond) - target).flatten(1).square().sum(dim=1)
    weight = 1.0 / (error.detach() + settings.adaptive_eps) ** settings.adaptive_power
    return (weight * error).mean()


class AverageVelocityPolicy(Policy):
    """One MeanFlow step as a policy: the constant velocity u = u_θ(x_src, r, t) over [r, t], so that the rollout
    from σ = t to σ = r lands on z_r = z_t − (t − r)·u (up to float round-off of the substep sum)."""

    def __init__(self, velocity: Tensor, x_src: Tensor, sigma_src: Tensor, eps: float = 1e-6):
        self.u = velocity.float()                                  # (B, C, *S)
        self.x_src = x_src.float()
        self.sigma_src = sigma_src.float().reshape(-1, *([1] * (x_src.dim() - 1)))
        self.eps = eps

    def _x0(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        return x_t - sigma_t * self.u

    def velocity_unchecked(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        return self.u.expand_as(x_t)

    def detach(self) -> "AverageVelocityPolicy":
        return AverageVelocityPolicy(self.u.detach(), self.x_src.detach(), self.sigma_src.reshape(-1), self.eps)

    def dropout(self, p: float, generator=None) -> "AverageVelocityPolicy":
        return self


def meanflow_sample(model: AverageVelocityModel, noise: Tensor, nfe: int = 1, cond: Any = None) -> Tensor:
    """`nfe` uniform average-velocity steps from t = 1 to 0 (z ← z − (t − r)·u(z, r, t)), through the one
    few-step loop (`FewStepSampler`)."""
    return meanflow_sampler(model, nfe).sample(noise, cond=cond)


def meanflow_sampler(model: AverageVelocityModel, nfe: int, teacher: Any = None) -> FewStepSampler:
    """A `FewStepSampler` of an average-velocity network: each step's policy is u_θ(x, r, t) over [r, t]."""
    def policy_fn(x: Tensor, t: Tensor, cond: Any, r: Tensor) -> AverageVelocityPolicy:
        return AverageVelocityPolicy(model(x, r, t, cond), x, t)

    return FewStepSampler(policy_fn, nfe, teacher, "MeanFlow", needs_step_end=True)


class MeanFlow(Method):
    """MeanFlow as a method: an `AverageVelocityNet` on the teacher's network (or a fresh backbone, ``init``)
    trained by `meanflow_loss` on the data — the teacher is not queried; sampled in `distill.nfe` uniform steps
    (any NFE at test time)."""

    name = "meanflow"
    title = "MeanFlow"
    paper = "Geng et al., Mean Flows for One-step Generative Modeling (2025), arXiv 2505.13447"
    section = "meanflow"
    settings_class = MeanFlowSettings
    loss_title = "MeanFlow loss (adaptively weighted)"

    def student(self) -> AverageVelocityNet:
        setup = self.setup
        if self.settings.init == "teacher" and setup.teacher_model is None:
            from piflow.config import ConfigError

            raise ConfigError("meanflow.init=teacher needs a teacher with a network (a teacher run); this teacher "
                              "has none: use meanflow.init=scratch or auto")
        scratch = self.settings.init == "scratch" or (self.settings.init == "auto"
                                                        and setup.teacher_conversion is not None)
        base = setup.new_backbone() if scratch else setup.base_network("meanflow.init=teacher")
        return AverageVelocityNet(base.requires_grad_(True), setup.num_timesteps)

    def loss_fn(self, student: AverageVelocityNet):
        setup, settings = self.setup, self.settings

        def loss_fn(iteration: int, generator: torch.Generator, backward) -> Tensor:
            x0, cond = setup.draw_data(generator, setup.batch_size)
            return meanflow_loss(student, x0, cond, settings, generator=generator)

        return loss_fn

    def sampler(self, student: AverageVelocityNet) -> FewStepSampler:
        return meanflow_sampler(student, self.setup.nfe, self.setup.teacher)
