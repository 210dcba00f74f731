"""Sinusoidal embeddings shared by the velocity networks.

* `timestep_embedding`: the classic transformer/diffusion sinusoid of a scalar timestep t = σ · num_timesteps.
* `fourier_position_embedding`: sin/cos features of low-dimensional coordinates (2-D toy data) with
  log-spaced periods, so an MLP can resolve both coarse and fine structure.
* `as_timestep`: normalizes a float / 0-d / (B,) / (B, 1) timestep into a (B,) tensor (used by the models).
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

TimestepLike = Union[Tensor, float, int]


def as_timestep(t: TimestepLike, batch: int, device: torch.device, name: str = "t") -> Tensor:
    """Turn a float, 0-d, (1,), (B,) or (B, 1) timestep into a float32 tensor of shape (B,) on `device`."""
    if not torch.is_tensor(t):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError(f"{name} must be a float or a tensor of shape (B,), got {type(t).__name__}")
        t = torch.tensor(float(t))
    t = t.to(device=device, dtype=torch.float32)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t.reshape(-1)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a float or a tensor of shape (B,) with B={batch}, "
                         f"got shape {tuple(t.shape)}")
    return t


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True) -> Tensor:
    """Sinusoidal embedding of timesteps.

    Args:
        t: (B,) timesteps (any real values; typically σ · 1000).
        dim: output size; the first/second half hold cos/sin (sin/cos without `flip_sin_to_cos`),
            an odd `dim` gets one trailing zero.
        max_period: the longest period; frequencies are exp(-ln(max_period) · k / (dim // 2)), k = 0 … dim//2 - 1.
        flip_sin_to_cos: put the cosine half first (DiT / GLIDE convention).

    Returns:
        (B, dim) float32 embedding.
    """
    if not torch.is_tensor(t) or t.dim() != 1:
        raise ValueError(f"t must be a tensor of shape (B,), got "
                         f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    if not max_period > 0:
        raise ValueError(f"max_period must be > 0, got {max_period}")
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)                     # (half,)
    args = t.to(torch.float32)[:, None] * freqs[None, :]                    # (B, half)
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def fourier_position_embedding(x: Tensor, dim_per_coord: int, min_period: float = 5e-3,
                               max_period: float = 50.0) -> Tensor:
    """Sin/cos features of coordinates with log-spaced periods.

    Args:
        x: (B, D) coordinates.
        dim_per_coord: features per coordinate (even); half are sines, half cosines, over
            n = dim_per_coord // 2 periods log-spaced from `min_period` to `max_period`.
        min_period, max_period: 0 < min_period ≤ max_period.

    Returns:
        (B, D · dim_per_coord) float32, laid out per coordinate as [sin(2πx/P_1..n), cos(2πx/P_1..n)].
    """
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"x must be a tensor of shape (B, D), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if int(dim_per_coord) != dim_per_coord or dim_per_coord < 2 or dim_per_coord % 2 != 0:
        raise ValueError(f"dim_per_coord must be a positive even integer, got {dim_per_coord}")
    if not (0 < min_period <= max_period):
        raise ValueError(f"need 0 < min_period <= max_period, got min_period={min_period}, "
                         f"max_period={max_period}")
    num_periods = dim_per_coord // 2
    periods = torch.logspace(math.log10(min_period), math.log10(max_period), num_periods,
                             device=x.device, dtype=torch.float32)          # (n,)
    angles = (2 * math.pi) * x.to(torch.float32)[:, :, None] / periods      # (B, D, n)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)         # (B, D, 2n)
    return emb.reshape(x.shape[0], -1)
