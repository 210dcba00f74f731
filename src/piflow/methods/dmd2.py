"""DMD2 (Yin et al., 2024), the distribution-matching baseline: the generator is pushed along the difference of a
frozen teacher ("real") score and an online "fake" score fitted to the generator's own samples.

Conventions are piflow's: σ ∈ [0, 1] the noise level, x_σ = (1 − σ)·x0 + σ·ε, a score network is a flow-matching
velocity model u(x_σ, σ, cond) (the `Teacher` protocol; CFG is the teacher's wrapper, `ClassifierFreeGuidance`),
whose x0 estimate is x̂0 = x_σ − σ·u. For generator samples x0 (with gradients) the distribution-matching loss is

    loss = ½·mean ‖x0 − sg(x0 − g)‖²,   g = (x̂0_fake − x̂0_real) / mean|x0 − x̂0_real|     (per sample),

so that ∂loss/∂x0 = g / (elements per sample): the generator moves towards the teacher's distribution, and g = 0
when the fake score equals the real one (the generator already samples the teacher's distribution). The fake score
is trained by plain flow matching on detached generator samples (`fake_score_loss`), several updates per generator
update (the two time-scale rule, `fake_updates_per_generator_update` = 5 in DMD2). Multi-step generators train on
states made by backward simulation (`backward_simulation`): the generator's own few-step chain from noise, run
without gradients to a random step. The GAN term of DMD2 is not included (it is optional there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import copy

import torch
from torch import Tensor, nn

from piflow.checks import draw
from piflow.methods.base import FewStepSampler, Method
from piflow.piid import forward_diffuse
from piflow.policies import DXPolicy
from piflow.timewarp import NUM_TIMESTEPS

VelocityModel = Callable[[Tensor, Tensor, Any], Tensor]        # u(x_σ (B, …), σ (B,), cond)
X0Generator = Callable[[Tensor, Tensor, Any], Tensor]          # x0 = G(x_σ (B, …), σ (B,), cond)


@dataclass(frozen=True)
class DMD2Settings:
    """σ range of the distribution-matching and fake-score noise draws (DMD2 uses t ∈ [0.02, 0.98]) and the
    fake-score updates per generator update."""

    sigma_min: float = 0.02
    sigma_max: float = 0.98
    fake_updates_per_generator_update: int = 5

    def __post_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max <= 1.0:
            raise ValueError(f"need 0 < sigma_min < sigma_max <= 1, got {self.sigma_min}, {self.sigma_max}")
        if int(self.fake_updates_per_generator_update) < 1:
            raise ValueError("fake_updates_per_generator_update must be >= 1, "
                             f"got {self.fake_updates_per_generator_update}")


def _noised(x0: Tensor, settings: DMD2Settings, generator: Optional[torch.Generator],
            noise: Optional[Tensor] = None, sigma: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    if sigma is None:
        sigma = settings.sigma_min + (settings.sigma_max - settings.sigma_min) * draw(
            "uniform", (x0.shape[0],), generator, x0.device, x0.dtype)
    noise = draw("normal", tuple(x0.shape), generator, x0.device, x0.dtype) if noise is None else noise
    return forward_diffuse(x0, sigma, noise), sigma, noise


def distribution_matching_gradient(x0: Tensor, real_score: VelocityModel, fake_score: VelocityModel,
                                   cond: Any = None, settings: DMD2Settings = DMD2Settings(),
                                   generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None,
                                   sigma: Optional[Tensor] = None) -> Tensor:
    """g = (x̂0_fake − x̂0_real)/mean|x0 − x̂0_real| at one noised copy of x0 (B, …), without gradients."""
    with torch.no_grad():
        x_t, sigma, _ = _noised(x0.detach(), settings, generator, noise, sigma)
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        x0_real = x_t - s * real_score(x_t, sigma, cond)
        x0_fake = x_t - s * fake_score(x_t, sigma, cond)
        scale = (x0.detach() - x0_real).abs().flatten(1).mean(dim=1).clamp(min=1e-8)
        return (x0_fake - x0_real) / scale.reshape(-1, *([1] * (x0.dim() - 1)))


def dmd_loss(x0: Tensor, real_score: VelocityModel, fake_score: VelocityModel, cond: Any = None,
             settings: DMD2Settings = DMD2Settings(), generator: Optional[torch.Generator] = None,
             noise: Optional[Tensor] = None, sigma: Optional[Tensor] = None) -> Tensor:
    """½·mean ‖x0 − sg(x0 − g)‖² for generator samples x0 (B, …) carrying gradients."""
    gradient = distribution_matching_gradient(x0, real_score, fake_score, cond, settings, generator, noise, sigma)
    return 0.5 * (x0 - (x0 - gradient).detach()).square().mean()


def fake_score_loss(fake_score: VelocityModel, x0: Tensor, cond: Any = None,
                    settings: DMD2Settings = DMD2Settings(), generator: Optional[torch.Generator] = None) -> Tensor:
    """Flow matching of the fake score on detached generator samples: mean ‖u_fake(x_σ, σ) − (ε − x0)‖²."""
    x0 = x0.detach()
    x_t, sigma, noise = _noised(x0, settings, generator)
    return (fake_score(x_t, sigma, cond) - (noise - x0)).square().mean()


def generator_sigmas(nfe: int, device=None, dtype=None) -> Tensor:
    """The few-step generator's input noise levels: σ_k = 1 − k/nfe, k = 0 … nfe − 1 (uniform, as DMD2's 4-step
    schedule is uniform in its timesteps)."""
    if int(nfe) < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return 1 - torch.arange(int(nfe), device=device, dtype=dtype) / int(nfe)


def backward_simulation(x0_generator: X0Generator, noise: Tensor, nfe: int, cond: Any = None,
                        generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """A training input for a multi-step generator: a random step k (one per batch), the generator's own chain
    from noise run to it without gradients. Returns (x_σk (B, …), σk (B,)); the caller evaluates G there with
    gradients."""
    sigmas = generator_sigmas(nfe, noise.device, noise.dtype)
    step = int(torch.randint(0, len(sigmas), (1,), generator=generator))
    x = noise
    with torch.no_grad():                 # x0 = G(x_σk, σk), then x_σ(k+1) = (1 − σ)·x0 + σ·ε with fresh noise ε
        for k in range(step):
            x0 = x0_generator(x, sigmas[k].expand(noise.shape[0]), cond)
            fresh = draw("normal", tuple(noise.shape), generator, noise.device, noise.dtype)
            x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * fresh
    return x, sigmas[step].expand(noise.shape[0])


class DMD2Student(nn.Module):
    """The two networks DMD2 trains, in one module (one optimiser, one checkpoint): the generator and the fake
    score, each a velocity network ``model(x, σ·S, cond)`` (both copies of the teacher's network when it has one).
    The generator predicts x0 = x_σ − σ·u_gen(x_σ, σ·S, cond).

    Training alternates on the iteration counter (`training_loss`): every iteration updates the fake score, every
    ``fake_updates_per_generator_update``-th one also the generator, so that one AdamW gives the two time-scale
    rule and a checkpoint holds both networks and their optimiser state."""

    def __init__(self, generator_model: nn.Module, fake_score_model: Optional[nn.Module] = None,
                 num_timesteps: float = NUM_TIMESTEPS):
        super().__init__()
        self.generator = generator_model
        self.fake_score = copy.deepcopy(generator_model) if fake_score_model is None else fake_score_model
        self.num_timesteps = float(num_timesteps)

    def x0(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        """The generator's x0 (B, …) from x_σ (B, …) at σ (B,)."""
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return x - s * self.generator(x, sigma * self.num_timesteps, cond)

    def fake_velocity(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        return self.fake_score(x, sigma * self.num_timesteps, cond)

    def policy(self, x: Tensor, sigma: Tensor, cond: Any = None) -> DXPolicy:
        """The generator's step as a policy: one constant x̂0 (a one-node DX policy, u = (x − x̂0)/σ)."""
        velocity = self.generator(x, sigma * self.num_timesteps, cond)
        return DXPolicy(velocity.unsqueeze(1), x, sigma)

    def sampler(self, nfe: int, teacher: Any = None) -> FewStepSampler:
        """DMD2's few-step sampling through the one loop: per step the generator's x̂0 (`policy`), rolled out to
        σ = 0 and re-noised to the next σ with fresh noise (h = 'inf'), on the uniform grid σ_k = 1 − k/nfe."""
        return FewStepSampler(self.policy, nfe, teacher, "DMD2", h="inf")


def training_loss(student: DMD2Student, real_score: VelocityModel, noise: Tensor, cond: Any, iteration: int,
                  nfe: int = 1, settings: DMD2Settings = DMD2Settings(),
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """One DMD2 iteration's loss on a noise batch (B, …) with conditions `cond`: the fake score's flow-matching
    loss on detached generator samples, plus — on every ``fake_updates_per_generator_update``-th iteration — the
    distribution-matching loss of the generator (its gradient reaches only the generator; the fake score's only
    the fake score). Multi-step generators (nfe > 1) start from a backward-simulated state of their own chain."""
    if nfe > 1:
        x, sigma = backward_simulation(student.x0, noise, nfe, cond, generator)
    else:
        x, sigma = noise, torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    update_generator = (iteration + 1) % int(settings.fake_updates_per_generator_update) == 0
    with torch.set_grad_enabled(update_generator):
        x0 = student.x0(x, sigma, cond)
    loss = fake_score_loss(student.fake_velocity, x0, cond, settings, generator)
    if update_generator:
        loss = loss + dmd_loss(x0, real_score, student.fake_velocity, cond, settings, generator)
    return loss


class DMD2(Method):
    """DMD2 as a method: a `DMD2Student` (generator and fake score, copies of the teacher's network — fresh
    backbones for a teacher without one) trained by `training_loss` on noise and drawn conditions.
    ``train.iters`` counts generator updates: the loop runs ``fake_updates_per_generator_update`` times as many
    iterations. Sampling: the generator's x̂0 per step, re-noised with fresh noise (h = 'inf'), on the uniform
    grid σ_k = 1 − k/nfe (shift 1, f = 1)."""

    name = "dmd2"
    title = "DMD2"
    paper = "Yin et al., Improved Distribution Matching Distillation (NeurIPS 2024), arXiv 2405.14867"
    section = "dmd2"
    settings_class = DMD2Settings
    loss_title = "DMD2 loss (fake score + distribution matching)"

    def loop_iterations(self, iters: int) -> int:
        return int(iters) * int(self.settings.fake_updates_per_generator_update)

    def student(self) -> DMD2Student:
        setup = self.setup
        generator = setup.base_network("method=dmd2")
        return DMD2Student(generator, setup.base_network() if setup.teacher_model is None else None,
                           num_timesteps=setup.num_timesteps)

    def loss_fn(self, student: DMD2Student):
        setup, settings, nfe = self.setup, self.settings, self.setup.nfe

        def loss_fn(iteration: int, generator: torch.Generator, backward) -> Tensor:
            noise = torch.randn(setup.batch_size, *setup.shape, generator=generator)
            cond = setup.draw_cond(generator, setup.batch_size)
            return training_loss(student, setup.teacher, noise, cond, iteration, nfe, settings, generator)

        return loss_fn

    def sampler(self, student: DMD2Student) -> FewStepSampler:
        return student.sampler(self.setup.nfe, self.setup.teacher)
