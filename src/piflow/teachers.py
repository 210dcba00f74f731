"""Teachers: anything callable as ``teacher(x_t, sigma_t, cond) -> u``.

* `NetworkTeacher` adapts a network that takes the timestep t = σ·num_timesteps (the diffusers/DiT convention).
* `ClassifierFreeGuidance` wraps a teacher with true CFG and a guidance interval (algorithm.md §4.5).
* `GaussianMixtureTeacher` is the *exact* flow-matching velocity of Gaussian-mixture data: piflow's zero-error
  reference. For data of shape (C,) it also gives the exact GMFlow policy at any state (`policy`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from piflow.checks import SigmaLike, check_finite, check_state
from piflow.policies.gmflow import GMFlowPolicy
from piflow.timewarp import NUM_TIMESTEPS


class Teacher(Protocol):
    def __call__(self, x_t: Tensor, sigma_t: Tensor, cond: Any = None) -> Tensor: ...


class NetworkTeacher:
    """Wrap ``model(x_t, t, cond) -> u`` (t = σ·num_timesteps) as a σ-space teacher; frozen, eval mode, no grad."""

    def __init__(self, model: Callable[..., Tensor], num_timesteps: float = NUM_TIMESTEPS):
        self.model = model
        self.num_timesteps = float(num_timesteps)

    @torch.no_grad()
    def __call__(self, x_t: Tensor, sigma_t: Tensor, cond: Any = None) -> Tensor:
        if isinstance(self.model, torch.nn.Module):
            self.model.eval()
        sigma = sigma_t.reshape(x_t.shape[0]).to(x_t.dtype)
        return self.model(x_t, sigma * self.num_timesteps, cond)


def _concat_cond(uncond: Any, cond: Any, batch: int) -> Any:
    if torch.is_tensor(cond):
        null = uncond if torch.is_tensor(uncond) else torch.full_like(cond, uncond)
        if null.shape[0] != batch:
            null = null.expand(batch, *null.shape[1:]) if null.shape[0] == 1 else null
        return torch.cat([null.to(cond.device, cond.dtype), cond])
    if isinstance(cond, dict):
        return {key: _concat_cond(uncond[key], value, batch) for key, value in cond.items()}
    raise TypeError(f"cond must be a tensor or a dict of tensors for classifier-free guidance, got {type(cond)}")


def _expand_cond(null: Any, batch: int) -> Any:
    """A batch-1 (or batch-`batch`) condition expanded to `batch`; dicts recursively, None and non-tensors as is."""
    if torch.is_tensor(null) and null.dim() > 0 and null.shape[0] == 1 and batch != 1:
        return null.expand(batch, *null.shape[1:])
    if isinstance(null, dict):
        return {key: _expand_cond(value, batch) for key, value in null.items()}
    return null


class ClassifierFreeGuidance:
    """True CFG: u = u_c + (w − 1)(u_c − u_u), with w := 1 outside the guidance interval.

    Args:
        teacher: σ-space teacher ``teacher(x, sigma, cond)``.
        guidance_scale: w (1 = no guidance).
        null_cond: the unconditional input (e.g. the null class index, or empty-prompt embeddings), same structure
            as `cond`; a Python number is broadcast like `cond`; or a callable ``null_cond(cond)`` for negatives
            that depend on the sample (an editing model's negative prompt encoded with each sample's reference
            image). Keys of a dict `cond` that a dict `null_cond` lacks (reference images) are shared by both
            branches.
        interval: inclusive (σ_low, σ_high) where guidance applies, checked per sample (σ units: divide a t-unit
            interval by num_timesteps).
        batched: double the batch as [uncond; cond] for one teacher call (default), or make two calls — for
            conditions that cannot be concatenated (text embeddings of different lengths, optional masks); a
            `null_cond` of batch 1 is then expanded, None entries pass through.
    """

    def __init__(self, teacher: Teacher, guidance_scale: float, null_cond: Any,
                 interval: Sequence[float] = (0.0, 1.0), batched: bool = True):
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"interval must be (low, high) with 0 <= low <= high <= 1, got {interval}")
        self.teacher, self.guidance_scale, self.null_cond = teacher, float(guidance_scale), null_cond
        self.interval = (float(interval[0]), float(interval[1]))
        self.batched = bool(batched)

    @torch.no_grad()
    def __call__(self, x_t: Tensor, sigma_t: Tensor, cond: Any = None) -> Tensor:
        if self.guidance_scale == 1.0:
            return self.teacher(x_t, sigma_t, cond)
        batch = x_t.shape[0]
        sigma = sigma_t.reshape(batch)
        null = self.null_cond(cond) if callable(self.null_cond) else self.null_cond
        if isinstance(null, dict) and isinstance(cond, dict):
            null = {**{k: v for k, v in cond.items() if k not in null}, **_expand_cond(null, batch)}
        if self.batched:
            u_uncond, u_cond = self.teacher(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]),
                                            _concat_cond(null, cond, batch)).chunk(2)
        else:
            u_cond = self.teacher(x_t, sigma, cond)
            u_uncond = self.teacher(x_t, sigma, _expand_cond(null, batch))
        inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
        scale = torch.where(inside, self.guidance_scale, 1.0).to(u_cond.dtype)
        scale = scale.reshape(batch, *([1] * (x_t.dim() - 1)))
        return u_cond + (scale - 1) * (u_cond - u_uncond)


class GaussianMixtureTeacher:
    """Exact velocity of rectified flow on Gaussian-mixture data p(x0) = Σ_k w_k N(m_k, std²·I).

    Args:
        means: (K, *shape) component means. std: shared isotropic std (> 0). weights: (K,) (normalised here).
    With s²(σ) = (1−σ)²std² + σ², x_σ | k ~ N((1−σ)m_k, s²·I) and
        E[u | x_σ, k] = (σ − (1−σ)std²)/s² · (x_σ − (1−σ)m_k) − m_k,
    averaged with posterior responsibilities r_k(x_σ) ∝ w_k N(x_σ; (1−σ)m_k, s²·I). Computed in float64.
    """

    def __init__(self, means: Tensor, std: float, weights: Optional[Tensor] = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"means must have shape (K, *shape) with at least one data dim, got {tuple(means.shape)}")
        if not (math.isfinite(float(std)) and float(std) > 0):
            raise ValueError(f"std must be a finite positive number, got {std}")
        num_components = means.shape[0]
        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num_components,):
            raise ValueError(f"weights must have shape (K,) = ({num_components},), got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        check_finite(means, "means")
        self.means = means
        self.std = float(std)
        self.weights = weights / weights.sum()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def _check(self, x_t: Tensor, sigma_t: SigmaLike, name: str) -> tuple[Tensor, Tensor]:
        sigma = check_state(x_t, name, (None, *self.data_shape), sigma_t, "sigma_t", dtype=torch.float64)
        return x_t.double(), sigma

    def _components(self, x: Tensor, sigma: Tensor):
        """Responsibilities (B, K) and per-component quantities at (x, σ) in float64."""
        means = self.means.to(x.device)
        alpha = 1 - sigma                                            # (B, 1, …)
        var = alpha.square() * self.std ** 2 + sigma.square()        # s², (B, 1, …)
        residual = x.unsqueeze(1) - alpha.unsqueeze(1) * means       # (B, K, *shape)
        dims = tuple(range(2, residual.dim()))
        dim = math.prod(self.data_shape)
        var_flat = var.reshape(-1, 1)
        log_resp = (torch.log(self.weights.to(x.device)) - 0.5 * residual.square().sum(dims) / var_flat
                    - 0.5 * dim * torch.log(var_flat))
        return torch.softmax(log_resp, dim=1), residual, alpha, var

    def velocity(self, x_t: Tensor, sigma_t: SigmaLike, cond: Any = None) -> Tensor:
        """Exact u(x_t, σ_t) = E[ε − x0 | x_t], shape and dtype of `x_t`."""
        x, sigma = self._check(x_t, sigma_t, "x_t")
        resp, residual, alpha, var = self._components(x, sigma)
        resp = resp.reshape(*resp.shape, *([1] * len(self.data_shape)))
        gain = ((sigma - alpha * self.std ** 2) / var).unsqueeze(1)
        u = (resp * (gain * residual - self.means.to(x.device))).sum(dim=1)
        return u.to(x_t.dtype)

    __call__ = velocity

    def x0(self, x_t: Tensor, sigma_t: SigmaLike) -> Tensor:
        """Exact E[x0 | x_t]."""
        x, sigma = self._check(x_t, sigma_t, "x_t")
        resp, residual, alpha, var = self._components(x, sigma)
        resp = resp.reshape(*resp.shape, *([1] * len(self.data_shape)))
        gain = (alpha * self.std ** 2 / var).unsqueeze(1)
        return (resp * (self.means.to(x.device) + gain * residual)).sum(dim=1).to(x_t.dtype)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n exact data samples, float32 (n, *shape)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        device = generator.device if generator is not None else "cpu"
        index = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.data_shape), generator=generator, device=device, dtype=torch.float64)
        return (self.means.to(device)[index] + self.std * noise).float()

    def policy(self, x_src: Tensor, sigma_src: SigmaLike, eps: float = 1e-6) -> GMFlowPolicy:
        """The exact GMFlow policy at (x_src, σ_src): p(x0 | x_src) as an x0-space GM.

        Only for data of shape (C,) (x_src (B, C)): there the whole vector is one GM chunk, and rolling this policy
        out reproduces the teacher ODE up to substep error.
        """
        if len(self.data_shape) != 1:
            raise ValueError("GaussianMixtureTeacher.policy needs data of shape (C,) (x_src (B, C)); with spatial "
                             "dims the posterior is not pixel-wise factorised and no exact GMFlow policy exists")
        x, sigma = self._check(x_src, sigma_src, "x_src")
        if bool((sigma <= 0).any()):
            raise ValueError("sigma_src must be > 0")
        resp, residual, alpha, var = self._components(x, sigma)
        gain = (alpha * self.std ** 2 / var).unsqueeze(1)                      # (B, 1, 1)
        post_means = self.means.to(x.device) + gain * residual                 # (B, K, C)
        post_var = (self.std ** 2 * sigma.square() / var).unsqueeze(1)        # (B, 1, 1)
        logits = torch.log(resp.clamp(min=1e-300)).unsqueeze(-1)              # (B, K, 1)
        return GMFlowPolicy.from_x0(post_means.float(), logits.float(), post_var.float(), x_src.float(),
                                    sigma.float().reshape(-1), eps=eps)
