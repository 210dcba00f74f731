"""The step schedule shared by training and sampling (algorithm.md §4.1, §5.1, §5.3).

Segment grids in raw time, NFE and step-size checks, the trajectory-mixing ratio and the GM temperature rule. Both
`piflow.piid` (training) and `piflow.sampling` (inference) import this module; neither imports the other.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

from piflow.checks import is_int

Temperature = Union[float, str]
DEFAULT_TOTAL_SUBSTEPS = 128      # Euler substeps per unit of raw time in the rollouts (the paper's value)


def check_nfe(nfe: int) -> int:
    """`nfe` as an int if it is an integer >= 1 (a whole float is accepted), else a ValueError."""
    if isinstance(nfe, bool) or not isinstance(nfe, (int, float)) or int(nfe) != nfe or int(nfe) < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    return int(nfe)


def check_final_step_size_scale(final_step_size_scale: float) -> float:
    """f as a float if it is a finite number > 0 (the last step's raw length relative to the others)."""
    value = float(final_step_size_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"final_step_size_scale must be a finite number > 0, got {final_step_size_scale}")
    return value


def segment_grid(nfe: int, final_step_size_scale: float = 1.0) -> list[float]:
    """Raw-time segment starts, from 1 downward: 1, 1 − base, …, f·base with base = 1/(nfe − 1 + f)."""
    nfe, scale = check_nfe(nfe), check_final_step_size_scale(final_step_size_scale)
    base = 1.0 / (nfe - 1 + scale)
    return [max(1.0 - i * base, 0.0) for i in range(nfe)]


def strength_raw_times(nfe: int, strength: float, final_step_size_scale: float = 1.0) -> list[float]:
    """Raw times of image-to-image at `strength` ∈ [0, 1] (diffusers' img2img convention): the last
    ⌊nfe·strength⌋ segment starts of the `nfe`-step grid, so strength 1 is the whole grid from σ = 1 and the steps
    that remain are exactly those of text-to-image from that point on; [] when no step remains (strength < 1/nfe)."""
    nfe = check_nfe(nfe)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    grid = segment_grid(nfe, final_step_size_scale)
    steps = min(int(math.floor(nfe * float(strength) + 1e-9)), nfe)
    return grid[nfe - steps:]


def check_raw_times(times: Sequence[float], name: str = "sigmas") -> list[float]:
    """An explicit step list (raw times, before the shift): strictly decreasing values in (0, 1]."""
    values = [float(t) for t in times] if isinstance(times, (list, tuple)) else None
    if values is None and hasattr(times, "tolist"):
        values = [float(t) for t in times.tolist()]
    if not values or any(not (math.isfinite(t) and 0 < t <= 1) for t in values) or any(
            b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be a non-empty, strictly decreasing list of numbers in (0, 1] (a 0 is "
                         f"appended), got {times!r}")
    return values


def dx_segment_size(nfe: int, final_step_size_scale: float = 1.0) -> float:
    """Raw-time length of one (non-final) segment, 1/(nfe − 1 + f); the whole [0, 1] for nfe = 1: the DX default."""
    grid = segment_grid(nfe, final_step_size_scale)
    return 1.0 - grid[1] if len(grid) > 1 else 1.0


def teacher_ratio(iteration: int, num_decay_iters: int) -> float:
    """Scheduled trajectory mixing ρ = 1 − min(iter, D)/D (0 when D ≤ 0): 1 = teacher path, 0 = on-policy."""
    if num_decay_iters <= 0:
        return 0.0
    return 1.0 - min(max(iteration, 0), num_decay_iters) / num_decay_iters


def auto_temperature(nfe: int) -> float:
    """The pipelines' 'auto' GM temperature: clamp(0.1·(nfe − 1), 0, 1)."""
    return min(max(0.1 * (nfe - 1), 0.0), 1.0)


def is_auto(value: Any) -> bool:
    """True for the word 'auto' (any case, surrounding spaces ignored): the keyword of number-or-'auto' settings."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def parse_temperature(temperature: Any) -> Temperature:
    """The one GM temperature rule (Python API, CLI, config files, UI): 'auto' (any case, spaces ignored) or a
    finite number >= 0, given as a number or as text holding one; returns "auto" or the float. Anything else
    (negative, NaN, ±Inf, a bool, another string) is a ValueError naming the argument."""
    if is_auto(temperature):
        return "auto"
    value = temperature
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"temperature must be a number >= 0 or 'auto', got {temperature!r}") from None
    elif isinstance(value, bool) or not (is_int(value) or isinstance(value, float) or hasattr(value, "__float__")):
        raise ValueError(f"temperature must be a number >= 0 or 'auto', got {temperature!r}")
    value = float(value)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"temperature must be a finite number >= 0 or 'auto', got {temperature!r}")
    return value


def resolve_temperature(temperature: Any, nfe: int) -> float:
    """The GM temperature to use at `nfe` steps: `parse_temperature`'s number, or `auto_temperature(nfe)` for
    'auto'."""
    value = parse_temperature(temperature)
    return auto_temperature(nfe) if value == "auto" else value
