"""Policy rollout: many cheap Euler substeps of a policy, uniform in raw time τ (algorithm.md §3).

A segment of raw length Δτ gets n = max(ceil(Δτ·total_substeps), 1) substeps of size Δτ/n (the authors' current
rounding, docs/algorithm.md §14), so no substep is longer than 1/total_substeps; every sample takes exactly its own n
substeps, and no sample runs zero-length substeps for another's (samples run longest first and leave the batch
when done). piflow subtracts a tolerance of 1e-4 substeps before the ceiling, so that float32
round-off in Δτ (e.g. 0.25·128 = 32.000004) never adds a nearly empty substep; the authors' code has no tolerance.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from piflow.checks import SigmaLike, as_batch_sigma, check_state
from piflow.policies.base import Policy
from piflow.schedule import DEFAULT_TOTAL_SUBSTEPS      # defined with the schedule; importable from here too
from piflow.timewarp import unwarp, warp


SUBSTEP_TOLERANCE = 1e-4


def num_substeps(tau_start: Tensor, tau_end: Tensor, total_substeps: int) -> Tensor:
    """Per-sample substep counts n = max(ceil((τ_start − τ_end)·total_substeps − 1e-4), 1) (long, same shape)."""
    return torch.ceil((tau_start - tau_end) * total_substeps - SUBSTEP_TOLERANCE).clamp(min=1).long()


def _substeps(policy: Policy, x: Tensor, tau_start: Tensor, tau_end: Tensor, step: Tensor, counts: Tensor,
              first: int, last: int, shift: float, sigma_start: Optional[Tensor]) -> Tensor:
    """Substeps `first` … `last` − 1 of the samples of `x` (all with counts ≥ `last`); a sample whose count is
    `last` ends exactly at τ_end."""
    index = torch.arange(first, last + 1, device=x.device, dtype=torch.float32).reshape(-1, *([1] * x.dim()))
    taus = torch.where(index >= counts, tau_end, tau_start - index * step).clamp(min=0)
    sigmas = warp(taus, shift)
    if first == 0 and sigma_start is not None:
        sigmas[0] = sigma_start
    return policy.substeps(x, sigmas)


def rollout_tau(policy: Policy, x_start: Tensor, tau_start: Tensor, tau_end: Tensor,
                total_substeps: int = DEFAULT_TOTAL_SUBSTEPS, shift: float = 1.0,
                sigma_start: Optional[Tensor] = None) -> Tensor:
    """Roll `policy` from raw time τ_start down to τ_end (tensors of shape (B, 1, …, 1), computed in float32).

    Gradients flow through every substep when the policy carries them. `sigma_start` (defaults to warp(τ_start))
    lets the first substep hit the policy's exact source state. Returns x at warp(τ_end), float32 (B, C, *S).

    Every sample takes exactly its own number of substeps, and only those: when the counts differ, the samples
    run longest first and each group leaves the batch when it is done (one gather of the policy, no zero-length
    substeps for the samples that finished early). A policy with a fused kernel (`Policy.fixed_batch`) gets the
    whole batch in one call instead, with zero-length substeps after each sample's count.
    """
    x = x_start.float()
    tau_start, tau_end = tau_start.float(), tau_end.float()      # float64 times would reach the float32 kernels
    sigma_start = None if sigma_start is None else sigma_start.float()
    counts = num_substeps(tau_start, tau_end, total_substeps)
    step = (tau_start - tau_end) / counts
    flat = counts.reshape(-1)
    max_count = int(flat.max())
    if int(flat.min()) == max_count or policy.fixed_batch:   # one count (sampling), or a fused kernel
        return _substeps(policy, x, tau_start, tau_end, step, counts, 0, max_count, shift, sigma_start)
    order = torch.argsort(flat, descending=True, stable=True)
    ordered = flat[order]
    policy, x, tau_start, tau_end, step, counts = (policy.take(order), x[order], tau_start[order], tau_end[order],
                                                   step[order], counts[order])
    sigma_start = None if sigma_start is None else sigma_start.expand_as(tau_start)[order]
    done, active, finished = 0, x.shape[0], []
    for count in sorted({int(c) for c in ordered.tolist()}):
        x = _substeps(policy.narrow(active), x, tau_start[:active], tau_end[:active], step[:active],
                      counts[:active], done, count, shift, None if sigma_start is None else sigma_start[:active])
        done, remaining = count, int((ordered > count).sum())
        finished.append(x[remaining:])
        x = x[:remaining]
        active = remaining
    return torch.cat(finished[::-1]).index_select(0, torch.argsort(order))


def rollout(policy: Policy, x_src: Tensor, sigma_src: SigmaLike, sigma_dst: SigmaLike,
            total_substeps: int = DEFAULT_TOTAL_SUBSTEPS, shift: float = 1.0) -> Tensor:
    """Integrate dx/dσ = π(x, σ) from σ_src down to σ_dst with Euler substeps uniform in raw time.

    Args:
        policy: any `Policy`.
        x_src: (B, C, *spatial) start state (usually the policy's own x_src).
        sigma_src, sigma_dst: floats or (B,) tensors in [0, 1] with σ_dst ≤ σ_src.
        total_substeps: substeps per unit of raw time (128 in the paper).
        shift: time warp m mapping raw time to σ (the sampler's shift).
    Returns:
        x at σ_dst, same shape and dtype as `x_src`.
    """
    if int(total_substeps) < 1:
        raise ValueError(f"total_substeps must be >= 1, got {total_substeps}")
    sigma_start = check_state(x_src, "x_src", policy.x_src.shape, sigma_src, "sigma_src",
                              f"the policy's state shape {tuple(policy.x_src.shape)}")
    batch, ndim, device = x_src.shape[0], x_src.dim(), x_src.device
    sigma_end = as_batch_sigma(sigma_dst, batch, ndim, device, name="sigma_dst")
    if bool((sigma_end > sigma_start).any()):
        raise ValueError("sigma_dst must be <= sigma_src (policies are rolled out towards the data)")
    x = rollout_tau(policy, x_src, unwarp(sigma_start, shift), unwarp(sigma_end, shift), int(total_substeps),
                    shift, sigma_start=sigma_start)
    return x.to(x_src.dtype)


def average_velocity(policy: Policy, x_a: Tensor, tau_a: Tensor, tau_b: Tensor,
                     total_substeps: int = DEFAULT_TOTAL_SUBSTEPS, shift: float = 1.0, eps: float = 1e-4,
                     sigma_a: Optional[Tensor] = None) -> Tensor:
    """The learner velocity of the micro-window loss: mean policy velocity over [τ_a, τ_b] (§3, `average_u`).

    For samples whose window rounds to ≥ 2 substeps the (grad-carrying) policy is rolled out from τ_a to τ_b and
    (x_a − x_b)/max(σ_a − σ_b, eps) is returned; otherwise the local velocity π(x_a, σ_a). τ_a, τ_b: (B, 1, …, 1).
    """
    x_a = x_a.float()
    sigma_a = warp(tau_a, shift) if sigma_a is None else sigma_a
    small = torch.round((tau_a - tau_b) * total_substeps) < 2
    num_small = int(small.sum())
    local = policy.velocity_unchecked(x_a, sigma_a) if num_small > 0 else None
    if num_small == small.numel():
        return local
    x_b = rollout_tau(policy, x_a, tau_a, tau_b, total_substeps, shift, sigma_start=sigma_a)
    mean_velocity = (x_a - x_b) / (sigma_a - warp(tau_b, shift)).clamp(min=eps)
    return mean_velocity if local is None else torch.where(small, local, mean_velocity)
