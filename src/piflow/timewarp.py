"""Raw time τ ↔ noise level σ (the "shift" warp), and the dynamic-shift rule.

σ = warp(τ) = m·τ / (1 + (m − 1)·τ)  and its exact inverse  τ = unwarp(σ) = σ / (m + (1 − m)·σ).
Both map [0, 1] onto [0, 1] monotonically and fix 0 and 1; m = 1 is the identity.
All substep and segment schedules in piflow are uniform in τ and mapped to σ with `warp`.
"""
from __future__ import annotations

import math
from typing import Union

from torch import Tensor

TimeLike = Union[Tensor, float]

# S, the factor between σ and a network's timestep input (t = σ·S): 1000 for every flow-matching model piflow knows
# (SiT/DiT, FLUX, SD3, Qwen-Image, Wan; diffusers' num_train_timesteps); the one source of that default
NUM_TIMESTEPS = 1000.0


def _check_shift(shift: float) -> float:
    shift = float(shift)
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite positive number, got {shift}")
    return shift


def warp(tau: TimeLike, shift: float = 1.0) -> TimeLike:
    """Raw time τ ∈ [0, 1] → noise level σ ∈ [0, 1] (same type/shape as `tau`)."""
    shift = _check_shift(shift)
    if shift == 1.0:
        return tau
    return shift * tau / (1 + (shift - 1) * tau)


def unwarp(sigma: TimeLike, shift: float = 1.0) -> TimeLike:
    """Noise level σ ∈ [0, 1] → raw time τ ∈ [0, 1]; the exact inverse of `warp`."""
    shift = _check_shift(shift)
    if shift == 1.0:
        return sigma
    return sigma / (shift + (1 - shift) * sigma)


def dynamic_shift(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_logshift: float = 0.5,
    max_logshift: float = 1.15,
) -> float:
    """Resolution-dependent shift m: log m is linear in the sequence length L.

    log m = base_logshift + (L − base_seq_len)·(max_logshift − base_logshift)/(max_seq_len − base_seq_len).
    Note: the reference training code counts L as H·W of the unpatchified latent while diffusers pipelines
    count 2×2-packed tokens (4× fewer); pass whichever your model was trained with.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    slope = (max_logshift - base_logshift) / (max_seq_len - base_seq_len)
    return math.exp(base_logshift + (seq_len - base_seq_len) * slope)
