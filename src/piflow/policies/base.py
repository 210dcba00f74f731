"""The policy protocol and the shape/range checks shared by all policies.

A policy is built once per network evaluation from (network output, x_src, σ_src) and is then a cheap,
network-free velocity field π(x_t, σ_t) → u valid for σ_t ≤ σ_src. All policy math runs in float32; results
are returned in the dtype of `x_t`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from piflow.checks import NonFiniteError, SigmaLike, check_state  # noqa: F401 (NonFiniteError:
# importable from here as before piflow.checks existed)


class Policy:
    """Base class of network-free policies. Subclasses implement `_x0` (float32 math, no checks), `detach` and
    `dropout`; `velocity_unchecked` and `euler_substep` are the unchecked float32 calls that rollouts make per
    substep (validated once per rollout instead)."""

    x_src: Tensor        # (B, C, *spatial), float32
    sigma_src: Tensor    # (B, 1, …, 1), float32

    @property
    def batch_size(self) -> int:
        return self.x_src.shape[0]

    def _x0(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        """x̂0 at float32 x_t (B, C, *spatial) and float32 σ_t (B, 1, …, 1); no validation."""
        raise NotImplementedError

    def velocity_unchecked(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        """u = (x_t − x̂0)/max(σ_t, eps) in float32; no validation (used inside rollouts)."""
        return (x_t - self._x0(x_t, sigma_t)) / sigma_t.clamp(min=self.eps)

    def euler_substep(self, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """One Euler substep x + π(x, σ)·(σ_next − σ) in float32 (the unit of `substeps`)."""
        return x + self.velocity_unchecked(x, sigma) * (sigma_next - sigma)

    def substeps(self, x: Tensor, sigmas: Tensor) -> Tensor:
        """Euler substeps from σ_0 to σ_N: x (B, C, *S) float32, sigmas (N+1, B, 1, …, 1); a sample whose
        σ_{j+1} = σ_j stays where it is. Policies may fuse the whole loop (GMFlow's CPU kernel does)."""
        for j in range(sigmas.shape[0] - 1):
            x = self.euler_substep(x, sigmas[j], sigmas[j + 1])
        return x

    def _check_state(self, x_t: Tensor, sigma_t: SigmaLike) -> tuple[Tensor, Tensor]:
        """Checks of the public `x0`/`velocity` (the rollouts call the unchecked `_x0`/`_velocity` per substep)."""
        sigma = check_state(x_t, "x_t", self.x_src.shape, sigma_t, "sigma_t",
                            f"the policy's state shape {tuple(self.x_src.shape)}")
        return x_t.float(), sigma

    def x0(self, x_t: Tensor, sigma_t: SigmaLike) -> Tensor:
        """Denoised estimate x̂0(x_t, σ_t), shape and dtype of `x_t`."""
        x, sigma = self._check_state(x_t, sigma_t)
        return self._x0(x, sigma).to(x_t.dtype)

    def velocity(self, x_t: Tensor, sigma_t: SigmaLike) -> Tensor:
        """Policy velocity π(x_t, σ_t) = (x_t − x̂0)/σ_t, shape and dtype of `x_t`."""
        x, sigma = self._check_state(x_t, sigma_t)
        return self.velocity_unchecked(x, sigma).to(x_t.dtype)

    __call__ = velocity

    def detach(self) -> "Policy":
        """A copy whose parameters carry no gradient (the rollout copy of π-ID)."""
        raise NotImplementedError

    def dropout(self, p: float, generator=None) -> "Policy":
        """Policy dropout (§4.3): a randomly perturbed copy for the detached rollout; no-op for p <= 0."""
        raise NotImplementedError

    def temperature(self, temperature: float) -> "Policy":
        """A sharpened copy for sampling (GMFlow, §5.3); policies without a temperature return themselves."""
        return self

    @property
    def fixed_batch(self) -> bool:
        """True when `substeps` should get the whole batch with each sample's zero-length substeps after its own
        count: its fused kernel skips them (GMFlow on the CPU) or is compiled for one batch shape (GMFlow on
        CUDA), instead of the samples leaving the batch as they finish."""
        return False

    def _batched(self, pick) -> "Policy":
        """A copy with `pick(tensor)` applied to every tensor attribute (all are per sample, batch first — the
        contract of piflow's policies; a policy holding shared tensors overrides `take` and `narrow`)."""
        policy = self.__class__.__new__(self.__class__)
        policy.__dict__.update({name: pick(value) if torch.is_tensor(value) and value.dim() > 0 else value
                                for name, value in self.__dict__.items()})
        return policy

    def take(self, index: Tensor) -> "Policy":
        """The policy of the samples `index` (1-D long), in that order (gradients flow back to this one)."""
        return self._batched(lambda value: value.index_select(0, index))

    def narrow(self, count: int) -> "Policy":
        """The policy of the first `count` samples (views, no copy)."""
        return self._batched(lambda value: value[:count])
