"""`PiFlow`: the one-object API — ``loss = pf(x0, cond)``, ``pf.data_free_loss(noise, cond)``, ``pf.sample(noise)``.

The student is any module ``student(x, sigma (B,), cond)`` returning either a `Policy` or a dict of policy
parameters (``means``/``logweights``/``logstds`` for GMFlow, ``u_grid`` for DX) that `PiFlow` turns into the
configured policy. The teacher is any ``teacher(x_t, sigma_t, cond) -> u``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from piflow.piid import (check_final_step_size_scale, check_nfe, dx_segment_size, piid_data_free_loss, piid_loss,
                         teacher_ratio)
from piflow.policies import DXPolicy, GMFlowPolicy, Policy, make_policy
from piflow.sampling import HLike, sample

POLICY_KINDS = {"gmflow": GMFlowPolicy, "dx": DXPolicy}


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if math.isinf(high):
            interval = f"{'>' if low_open else '>='} {low}"
        else:
            interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number {interval}, got {value!r}")
    return float(value)
POLICY_OUTPUTS = {"gmflow": frozenset({"means", "logstds", "logweights"}), "dx": frozenset({"u_grid"})}


class PiFlow(nn.Module):
    """π-Flow distillation and sampling around a policy student.

    Args:
        student: module ``(x, sigma, cond) -> Policy | dict``.
        teacher: ``(x_t, sigma_t, cond) -> u`` (frozen; queried under no_grad).
        policy: "gmflow" or "dx".
        nfe: training number of steps (sampling may use any NFE for GMFlow students).
        final_step_size_scale, shift: segment grid and time warp (§4.1, §1.2).
        num_intermediate_states, window_substeps, gm_dropout, loss_scale, total_substeps: π-ID settings (§4.3).
        num_decay_iters: trajectory-mixing schedule length D (teacher_ratio = 1 − iter/D), 0 = on-policy only.
        policy_kwargs: extra policy settings (GM ``eps``; DX ``mode``, ``segment_size``, ``shift``, ``eps``).
            DX defaults: segment_size = one segment (1/(nfe − 1 + f)), shift = `shift`.
    """

    def __init__(self, student: nn.Module, teacher: Callable[..., Tensor], policy: str = "gmflow", nfe: int = 4,
                 final_step_size_scale: float = 1.0, shift: float = 1.0, num_intermediate_states: int = 2,
                 window_substeps: int = 0, gm_dropout: Optional[float] = None, loss_scale: float = 3.0,
                 total_substeps: int = 128, num_decay_iters: int = 0, policy_kwargs: Optional[dict] = None):
        super().__init__()
        kind = policy.lower()
        if kind == "gm":
            kind = "gmflow"
        if kind not in POLICY_KINDS:
            raise ValueError(f"unknown policy {policy!r}; expected one of {sorted(POLICY_KINDS)}")
        for name, value, low in (("num_intermediate_states", num_intermediate_states, 1),
                                 ("window_substeps", window_substeps, 0), ("total_substeps", total_substeps, 1),
                                 ("num_decay_iters", num_decay_iters, 0)):
            _integer(name, value, low)
        _number("loss_scale", loss_scale, 0.0, low_open=True)
        _number("shift", shift, 0.0, low_open=True)
        if gm_dropout is not None:
            _number("gm_dropout", gm_dropout, 0.0, 1.0, high_open=True)
        self.student = student
        self.teacher = teacher
        self.policy_kind = kind
        self.nfe = check_nfe(nfe)
        self.final_step_size_scale = check_final_step_size_scale(final_step_size_scale)
        self.shift = float(shift)
        if gm_dropout is None:
            gm_dropout = 0.05 if kind == "gmflow" else 0.0
        if gm_dropout > 0 and kind != "gmflow":
            raise ValueError("gm_dropout applies to GMFlow policies only; use gm_dropout=0 with policy='dx'")
        self.segment_kwargs = dict(num_intermediate_states=int(num_intermediate_states),
                                   window_substeps=int(window_substeps), gm_dropout=float(gm_dropout),
                                   loss_scale=float(loss_scale), total_substeps=int(total_substeps))
        self.num_decay_iters = int(num_decay_iters)
        self.policy_kwargs = dict(policy_kwargs or {})
        if kind == "dx":
            self.policy_kwargs.setdefault("segment_size", dx_segment_size(self.nfe, self.final_step_size_scale))
            self.policy_kwargs.setdefault("shift", self.shift)

    def policy(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Policy:
        """Evaluate the student once at (x, σ) and return its policy."""
        out = self.student(x, sigma, cond)
        if isinstance(out, Policy):
            if not isinstance(out, POLICY_KINDS[self.policy_kind]):
                raise TypeError(f"student returned a {type(out).__name__}, but PiFlow was built with "
                                f"policy={self.policy_kind!r}")
            return out
        if not isinstance(out, dict):
            raise TypeError(f"student must return a Policy or a dict of policy parameters, got {type(out).__name__}")
        if not POLICY_OUTPUTS[self.policy_kind] <= set(out):
            other = next((kind for kind, keys in POLICY_OUTPUTS.items() if keys <= set(out)), None)
            hint = (f"a {other} student: build PiFlow with policy={other!r}" if other is not None else
                    f"expected {sorted(POLICY_OUTPUTS[self.policy_kind])}")
            raise ValueError(f"PiFlow(policy={self.policy_kind!r}) got student outputs {sorted(out)}, i.e. {hint}")
        return make_policy(self.policy_kind, **out, x_src=x, sigma_src=sigma, **self.policy_kwargs)

    def forward(self, x0: Tensor, cond: Any = None, iteration: int = 0,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Data-dependent π-ID loss on a batch of data x0 (B, C, *spatial)."""
        out = piid_loss(self.policy, self.teacher, x0, cond, nfe=self.nfe,
                        final_step_size_scale=self.final_step_size_scale, shift=self.shift, generator=generator,
                        teacher_ratio=teacher_ratio(iteration, self.num_decay_iters), **self.segment_kwargs)
        return out.loss

    def data_free_loss(self, noise: Tensor, cond: Any = None, iteration: int = 0,
                       backward: Union[bool, Callable[[Tensor], None]] = True,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """Data-free multistep π-ID from pure noise (B, C, *spatial); back-propagates per step by default."""
        return piid_data_free_loss(self.policy, self.teacher, noise, cond, nfe=self.nfe,
                                   final_step_size_scale=self.final_step_size_scale, shift=self.shift,
                                   backward=backward, generator=generator,
                                   teacher_ratio=teacher_ratio(iteration, self.num_decay_iters),
                                   **self.segment_kwargs)

    @torch.no_grad()
    def sample(self, noise: Tensor, nfe: Optional[int] = None, cond: Any = None, *,
               temperature: Union[float, str] = 1.0, h: HLike = 0.0, generator: Optional[torch.Generator] = None,
               return_trajectory: bool = False, progress: bool = False):
        """Generate from noise (B, C, *spatial) with `nfe` student evaluations (default: the training NFE)."""
        return sample(self.policy, noise, self.nfe if nfe is None else nfe, cond, shift=self.shift,
                      final_step_size_scale=self.final_step_size_scale, h=h, temperature=temperature,
                      total_substeps=self.segment_kwargs["total_substeps"], generator=generator,
                      return_trajectory=return_trajectory, progress=progress)
