"""The policy protocol and the shape/range checks shared by all policies.

A policy is built once per network evaluation from (network output, x_src, σ_src) and is then a cheap,
network-free velocity field π(x_t, σ_t) → u valid for σ_t ≤ σ_src. All policy math runs in float32; results
are returned in the dtype of `x_t`.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

SigmaLike = Union[Tensor, float]


def draw(kind: str, shape, generator, device, dtype=None) -> Tensor:
    """``torch.rand`` ("uniform") or ``torch.randn`` ("normal") drawn on the generator's device and moved to
    `device`, so a CPU generator drives GPU training reproducibly (without a generator: drawn on `device`)."""
    source = generator.device if generator is not None else device
    fn = torch.rand if kind == "uniform" else torch.randn
    return fn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


class NonFiniteError(ValueError):
    """An input or a policy parameter holds NaN or ±Inf (during training: usually diverged weights)."""


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise `NonFiniteError` (a ValueError) if `tensor` holds NaN or ±Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{name} contains non-finite values (NaN or Inf)")


def as_batch_sigma(sigma: SigmaLike, batch: int, ndim: int, device: torch.device, name: str = "sigma",
                   check: bool = True, low: float = 0.0, high: float = 1.0,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn a float, 0-d, (B,) or (B, 1, …, 1) noise level/time into a `dtype` tensor of shape (B, 1, …, 1).

    `ndim` is the number of dimensions of the matching x (B, C, *spatial). With `check`, values must be finite
    and lie in [low, high]; otherwise a ValueError names the argument.
    """
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma), dtype=torch.float64)
    sigma = sigma.to(device=device, dtype=dtype)
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    elif sigma.dim() == 1 or (sigma.dim() == ndim and all(s == 1 for s in sigma.shape[1:])):
        sigma = sigma.reshape(-1)
        if sigma.shape[0] != batch:
            if sigma.shape[0] == 1:
                sigma = sigma.expand(batch)
            else:
                raise ValueError(f"{name} must have shape (B,) with B={batch} (or be a float), "
                                 f"got shape {tuple(sigma.shape)}")
    else:
        raise ValueError(f"{name} must be a float or a tensor of shape (B,) with B={batch}, "
                         f"got shape {tuple(sigma.shape)}")
    if check:
        bad = ~torch.isfinite(sigma) | (sigma < low) | (sigma > high)
        if bool(bad.any()):
            raise ValueError(f"{name} must lie in [{low}, {high}], got values "
                             f"{sigma[bad][:4].tolist()}")
    return sigma.reshape(batch, *([1] * (ndim - 1)))


class Policy:
    """Base class of network-free policies. Subclasses implement `_x0` (float32 math, no checks)."""

    x_src: Tensor        # (B, C, *spatial), float32
    sigma_src: Tensor    # (B, 1, …, 1), float32

    @property
    def batch_size(self) -> int:
        return self.x_src.shape[0]

    def _x0(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        """x̂0 at float32 x_t (B, C, *spatial) and float32 σ_t (B, 1, …, 1); no validation."""
        raise NotImplementedError

    def _velocity(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        """u = (x_t − x̂0)/max(σ_t, eps) in float32; no validation (used inside rollouts)."""
        return (x_t - self._x0(x_t, sigma_t)) / sigma_t.clamp(min=self.eps)

    def _euler_step(self, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """One Euler substep x + π(x, σ)·(σ_next − σ) in float32 (policies may fuse it)."""
        return x + self._velocity(x, sigma) * (sigma_next - sigma)

    def _check_state(self, x_t: Tensor, sigma_t: SigmaLike) -> tuple[Tensor, Tensor]:
        """Checks of the public `x0`/`velocity` (the rollouts call the unchecked `_x0`/`_velocity` per substep)."""
        if x_t.shape != self.x_src.shape:
            raise ValueError(f"x_t must have the policy's state shape {tuple(self.x_src.shape)}, "
                             f"got {tuple(x_t.shape)}")
        check_finite(x_t.detach(), "x_t")
        sigma = as_batch_sigma(sigma_t, x_t.shape[0], x_t.dim(), x_t.device, name="sigma_t")
        return x_t.float(), sigma

    def x0(self, x_t: Tensor, sigma_t: SigmaLike) -> Tensor:
        """Denoised estimate x̂0(x_t, σ_t), shape and dtype of `x_t`."""
        x, sigma = self._check_state(x_t, sigma_t)
        return self._x0(x, sigma).to(x_t.dtype)

    def velocity(self, x_t: Tensor, sigma_t: SigmaLike) -> Tensor:
        """Policy velocity π(x_t, σ_t) = (x_t − x̂0)/σ_t, shape and dtype of `x_t`."""
        x, sigma = self._check_state(x_t, sigma_t)
        return self._velocity(x, sigma).to(x_t.dtype)

    __call__ = velocity

    def detach(self) -> "Policy":
        raise NotImplementedError
