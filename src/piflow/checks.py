"""Input checks and random draws shared by every layer (pure PyTorch, no piflow imports).

Every check raises a one-line `ValueError` that names the argument and what it expects.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

SigmaLike = Union[Tensor, float]


class NonFiniteError(ValueError):
    """An input or a policy parameter holds NaN or ±Inf (during training: usually diverged weights)."""


def draw(kind: str, shape, generator, device, dtype=None) -> Tensor:
    """``torch.rand`` ("uniform") or ``torch.randn`` ("normal") drawn on the generator's device and moved to
    `device`, so a CPU generator drives GPU training reproducibly (without a generator: drawn on `device`)."""
    source = generator.device if generator is not None else device
    fn = torch.rand if kind == "uniform" else torch.randn
    return fn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise `NonFiniteError` (a ValueError) if `tensor` holds NaN or ±Inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{name} contains non-finite values (NaN or Inf)")


def is_int(value: Any) -> bool:
    """True for Python/numpy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, low: int = 1) -> int:
    """`value` as an int if it is an integer >= `low` (not a bool), else a ValueError naming `name`."""
    if not is_int(value) or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def positive_int(value: Any, name: str) -> int:
    """`value` as an int if it is an integer >= 1 (not a bool), else a ValueError naming `name`."""
    if not is_int(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_number(value: Any, name: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> float:
    """`value` as a float if it is a finite real number (not a bool) in the interval, else a ValueError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if math.isinf(high) and math.isinf(low):
            interval = ""
        elif math.isinf(high):
            interval = f" {'>' if low_open else '>='} {low}"
        else:
            interval = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number{interval}, got {value!r}")
    return float(value)


def positive_float(value: Any, name: str) -> float:
    """`value` as a float if it is a finite real number > 0 (not a bool), else a ValueError naming `name`."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def as_batch_sigma(sigma: SigmaLike, batch: int, ndim: int, device: torch.device, name: str = "sigma",
                   check: bool = True, low: float = 0.0, high: float = 1.0,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn a float, 0-d, (B,) or (B, 1, …, 1) noise level/time into a `dtype` tensor of shape (B, 1, …, 1).

    `ndim` is the number of dimensions of the matching x (B, C, *spatial); ``ndim=1`` gives shape (B,). With
    `check`, values must be finite and lie in [low, high]; otherwise a ValueError names the argument.
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


def check_state(x: Tensor, name: str, shape: Sequence[Optional[int]], sigma: SigmaLike, sigma_name: str,
                expected: Optional[str] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The one check of a (state, noise level) input pair, used by the policies, the rollout and the exact
    teacher: `x` has `shape` (None: any size on that axis; `expected` words the shape in the error, default
    ``shape (…)``), holds no NaN/Inf (`check_finite`), and `sigma` is a noise level in [0, 1] for its batch;
    returns σ as a `dtype` tensor of shape (B, 1, …, 1) (`as_batch_sigma`)."""
    if len(x.shape) != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        wanted = expected or f"shape ({', '.join('B' if want is None else str(want) for want in shape)})"
        raise ValueError(f"{name} must have {wanted}, got {tuple(x.shape)}")
    check_finite(x.detach(), name)
    return as_batch_sigma(sigma, x.shape[0], x.dim(), x.device, name=sigma_name, dtype=dtype)
