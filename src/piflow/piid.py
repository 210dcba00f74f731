"""π-ID: policy-based imitation distillation (algorithm.md §4).

The student, evaluated once at (x_src, σ_src), returns a policy. Its detached (dropout-perturbed) copy is rolled out
to states inside the segment; the teacher's velocity at those states is the target for the grad-carrying policy's
velocity (local, or averaged over a micro-window), with a plain ℓ2 loss.

A *student* here is any callable ``student(x_src, sigma_src, cond) -> Policy`` (σ_src of shape (B,)), a *teacher* any
callable ``teacher(x_t, sigma_t, cond) -> u``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from piflow.checks import check_finite, draw
from piflow.policies.base import Policy
from piflow.rollout import average_velocity, rollout_tau
from piflow.schedule import check_final_step_size_scale, check_nfe, segment_grid
from piflow.settings import PiIDSettings
from piflow.timewarp import warp

Student = Callable[[Tensor, Tensor, Any], Policy]
TeacherFn = Callable[[Tensor, Tensor, Any], Tensor]


def sample_segments(batch_size: int, nfe: int, final_step_size_scale: float = 1.0, eps: float = 1e-4,
                    generator: Optional[torch.Generator] = None, device: Union[str, torch.device] = "cpu"
                    ) -> tuple[Tensor, Tensor]:
    """Draw one training segment per sample, with probability proportional to its raw length (§4.1).

    Returns (tau_src, segment_size), both float32 (B,): the segment's raw start time and raw length.
    """
    nfe, scale = check_nfe(nfe), check_final_step_size_scale(final_step_size_scale)
    base = 1.0 / (nfe - 1 + scale)
    tau = (1 - draw("uniform", (batch_size,), generator, device)).clamp(min=eps)
    index = torch.ceil(tau / base + 1 - scale).clamp(1, nfe)
    tau_src = ((index - 1 + scale) * base).clamp(eps, 1.0)
    segment_size = torch.where(index == 1, scale * base, base)
    return tau_src.float(), segment_size.float()


def _sorted_spacings(batch: int, count: int, generator, device) -> Tensor:
    """`count` uniform spacings of [0, 1] (sorted draws, differences with 0 and 1 appended): (B, count)."""
    draws = draw("uniform", (batch, count - 1), generator, device).sort(dim=1).values
    edges = torch.cat([draws.new_zeros(batch, 1), draws, draws.new_ones(batch, 1)], dim=1)
    return edges.diff(dim=1)


class SegmentLoss(NamedTuple):
    loss: Tensor                 # scalar
    x_dst: Optional[Tensor]      # (B, C, *S) state at the segment end (detached policy), when asked for
    sigma_teacher: Tensor        # (M·B,) noise levels where the teacher was queried (for logging)


def piid_segment_loss(policy: Policy, teacher: TeacherFn, cond: Any, tau_src: Tensor, segment_size: Tensor,
                      settings: PiIDSettings, *, teacher_ratio: float = 0.0, eps: float = 1e-4,
                      return_x_dst: bool = False, generator: Optional[torch.Generator] = None) -> SegmentLoss:
    """The π-ID loss of one segment per sample (§4.3).

    Args:
        policy: the student's grad-carrying policy built at (x_src, σ_src) — x_src/σ_src are read from it.
        teacher: ``teacher(x_t, sigma_t (B,), cond) -> u``; queried under no_grad.
        tau_src, segment_size: (B,) raw start time and raw length S of each sample's segment.
        settings: read here are num_intermediate_states (M teacher queries), window_substeps (w; the learner
            velocity is averaged over Δ = w·δ raw time, 0 = local), policy_dropout (on the detached rollout copy),
            loss_scale (factor on ½·MSE), total_substeps and shift.
        teacher_ratio: ρ ∈ [0, 1]; fraction of each segment walked with teacher Euler steps (trajectory mixing).
    """
    if not 0.0 <= teacher_ratio <= 1.0:
        raise ValueError(f"teacher_ratio must lie in [0, 1], got {teacher_ratio}")
    count, total_substeps, shift = settings.num_intermediate_states, settings.total_substeps, settings.shift
    x_src = policy.x_src
    batch, ndim, device = x_src.shape[0], x_src.dim(), x_src.device
    shape = (batch,) + (1,) * (ndim - 1)
    if tau_src.shape != (batch,) or segment_size.shape != (batch,):
        raise ValueError(f"tau_src and segment_size must have shape (B,) = ({batch},), got "
                         f"{tuple(tau_src.shape)} and {tuple(segment_size.shape)}")
    tau_src = tau_src.to(device, torch.float32).reshape(shape)
    seg = segment_size.to(device, torch.float32).reshape(shape)

    seg_substeps = torch.round(seg * total_substeps).clamp(min=1)
    window = torch.minimum(settings.window_substeps * seg / seg_substeps, seg)
    span = seg - window                                               # room for the intermediate states
    student_draws = (draw("uniform", (batch, count), generator, device)
                     * (1 - teacher_ratio) * span.reshape(batch, 1)).sort(dim=1).values
    student_gaps = student_draws.diff(dim=1, prepend=student_draws.new_zeros(batch, 1))
    teacher_gaps = _sorted_spacings(batch, count, generator, device) * teacher_ratio * span.reshape(batch, 1)

    rollout_policy = policy.detach()
    if settings.policy_dropout > 0:
        rollout_policy = rollout_policy.dropout(settings.policy_dropout, generator=generator)

    x, tau, sigma = x_src, tau_src, policy.sigma_src
    predictions, targets, sigmas = [], [], []
    for j in range(count):
        tau_a = (tau - student_gaps[:, j].reshape(shape)).clamp(min=0)
        tau_b = (tau_a - teacher_gaps[:, j].reshape(shape)).clamp(min=0)
        with torch.no_grad():
            x_a = rollout_tau(rollout_policy, x, tau, tau_a, total_substeps, shift, sigma_start=sigma)
            sigma_a = warp(tau_a, shift)
            u_target = teacher(x_a, sigma_a.reshape(batch), cond).float()
        if u_target.shape != x_a.shape:
            raise ValueError(f"teacher returned shape {tuple(u_target.shape)}, expected {tuple(x_a.shape)}")
        u_pred = average_velocity(policy, x_a, tau_a, (tau_b - window).clamp(min=0), total_substeps, shift, eps,
                                  sigma_a=sigma_a)
        predictions.append(u_pred)
        targets.append(u_target)
        sigmas.append(sigma_a.reshape(batch))
        sigma_b = warp(tau_b, shift)
        x, tau, sigma = x_a + u_target * (sigma_b - sigma_a), tau_b, sigma_b

    u_pred, u_target = torch.cat(predictions), torch.cat(targets)
    per_sample = (u_pred - u_target).square().flatten(1).mean(dim=1)
    loss = settings.loss_scale * 0.5 * per_sample.mean()
    x_dst = None
    if return_x_dst:
        with torch.no_grad():
            x_dst = rollout_tau(rollout_policy, x, tau, (tau_src - seg).clamp(min=0), total_substeps, shift,
                                sigma_start=sigma)
    return SegmentLoss(loss, x_dst, torch.cat(sigmas))


def forward_diffuse(x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε with σ of shape (B,)."""
    sigma = sigma.to(x0.dtype).reshape(x0.shape[0], *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def piid_loss(student: Student, teacher: TeacherFn, x0: Tensor, cond: Any, settings: PiIDSettings, *,
              iteration: int = 0, eps: float = 1e-4, generator: Optional[torch.Generator] = None) -> SegmentLoss:
    """Data-dependent π-ID (§4.2): random segment per sample, forward-diffused real data as x_src, one segment loss
    (trajectory mixing at `iteration` of the settings' schedule)."""
    check_finite(x0, "x0")
    batch = x0.shape[0]
    tau_src, segment_size = sample_segments(batch, settings.nfe, settings.final_step_size_scale, eps, generator,
                                            x0.device)
    sigma_src = warp(tau_src, settings.shift)
    noise = draw("normal", x0.shape, generator, x0.device, x0.dtype)
    x_src = forward_diffuse(x0, sigma_src, noise)
    policy = student(x_src, sigma_src, cond)
    return piid_segment_loss(policy, teacher, cond, tau_src, segment_size, settings,
                             teacher_ratio=settings.teacher_ratio(iteration), eps=eps, generator=generator)


def piid_data_free_loss(student: Student, teacher: TeacherFn, noise: Tensor, cond: Any, settings: PiIDSettings, *,
                        iteration: int = 0, backward: Optional[Callable[[Tensor], None]] = Tensor.backward,
                        eps: float = 1e-4,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """Data-free multistep π-ID (§4.4): walk all nfe segments from pure noise along the student's own policy.

    Step k's loss is weighted by its raw length S_k (Σ S_k = 1). Each step is back-propagated immediately with
    `backward` (default ``Tensor.backward``; the training loop passes its own, which applies gradient-accumulation
    and fp16 loss scaling) and its graph freed, and the detached total is returned; ``backward=None`` returns the
    graph-carrying sum instead.
    """
    check_finite(noise, "noise")
    starts = segment_grid(settings.nfe, settings.final_step_size_scale)
    ratio = settings.teacher_ratio(iteration)
    batch = noise.shape[0]
    x = noise
    total = noise.new_zeros((), dtype=torch.float32)
    for k, tau in enumerate(starts):
        seg = (starts[k] - starts[k + 1]) if k + 1 < len(starts) else starts[k]
        tau_src = noise.new_full((batch,), tau, dtype=torch.float32)
        seg_size = noise.new_full((batch,), seg, dtype=torch.float32)
        policy = student(x, warp(tau_src, settings.shift), cond)
        out = piid_segment_loss(policy, teacher, cond, tau_src, seg_size, settings, teacher_ratio=ratio, eps=eps,
                                return_x_dst=True, generator=generator)
        step_loss = out.loss * seg
        if backward is not None:
            backward(step_loss)
            step_loss = step_loss.detach()
        total = total + step_loss
        x = out.x_dst.to(noise.dtype)
    return total
