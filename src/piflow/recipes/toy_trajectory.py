"""`piflow toy-trajectory`: fit one static GM policy (no network) to a single teacher trajectory with π-ID (§10).

The policy's parameters are free tensors: K u-space means initialised at the teacher's velocity at σ = 1 plus
N(0, 0.5²) noise, a log-std of log 0.05 and uniform weights. Each iteration draws raw times τ ~ U(0, 1], rolls the
detached policy from the fixed noise to those times and regresses the policy velocity onto the teacher's there.
Shows that a K = 32 GM policy can follow a whole teacher trajectory from one evaluation.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from piflow.errors import ConfigError
from piflow.files import write_json
from piflow.policies import GMFlowPolicy
from piflow.progress import progress_bar
from piflow.rollout import rollout
from piflow.sampling import euler_sample
from piflow.schedule import DEFAULT_TOTAL_SUBSTEPS


def fit_static_policy(teacher, noise: torch.Tensor, cond, num_components: int = 32, iters: int = 2000,
                      lr: float = 5e-3, times_per_iter: int = 2, snapshot_every: int = 250, seed: int = 0,
                      total_substeps: int = DEFAULT_TOTAL_SUBSTEPS, progress: bool = True):
    """Returns (policy_params dict, snapshots [(iteration, x0 image (1, C, *S))], loss history)."""
    gen = torch.Generator().manual_seed(seed)
    batch = noise.shape[0]
    with torch.no_grad():
        u_start = teacher(noise, torch.ones(batch), cond).float()
    means = torch.nn.Parameter(u_start.unsqueeze(1).repeat(1, num_components, *([1] * (noise.dim() - 1)))
                               + 0.5 * torch.randn(batch, num_components, *noise.shape[1:], generator=gen))
    logits = torch.nn.Parameter(torch.zeros(batch, num_components, 1, *noise.shape[2:]))
    logstd = torch.nn.Parameter(torch.full((batch,), math.log(0.05)))
    optimizer = torch.optim.Adam([means, logits, logstd], lr=lr)

    def policy() -> GMFlowPolicy:
        return GMFlowPolicy(means, logstd, torch.log_softmax(logits, dim=1), noise, 1.0)

    snapshots, history = [], []
    bar = progress_bar(iters, "toy trajectory", enabled=progress)
    for iteration in range(iters + 1):
        if iteration % snapshot_every == 0 or iteration == iters:
            with torch.no_grad():
                snapshots.append((iteration, rollout(policy(), noise, 1.0, 0.0, total_substeps)))
        if iteration == iters:
            break
        current = policy()
        frozen = current.detach()
        loss = 0.0
        for _ in range(times_per_iter):
            tau = float((1 - torch.rand((), generator=gen)).clamp(min=1e-4))
            with torch.no_grad():
                x_t = rollout(frozen, noise, 1.0, tau, total_substeps)
                u_target = teacher(x_t, torch.full((batch,), tau), cond).float()
            loss = loss + (current.velocity(x_t, tau) - u_target).square().mean() / times_per_iter
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        bar.update(1)
    bar.close()
    return {"means": means.detach(), "logits": logits.detach(), "logstd": logstd.detach()}, snapshots, history


def run_toy_trajectory(teacher_run: Path, run_dir: Path, label: int = 3, iters: int = 2000,
                       num_components: int = 32, seed: int = 0, snapshot_every: int = 250) -> dict:
    from piflow.recipes import images, plots

    teacher_model, teacher_config = images.load_teacher(str(teacher_run))
    num_classes = teacher_model.config.num_classes
    if not 0 <= label < max(num_classes, 1):
        raise ConfigError(f"--label must lie in [0, {num_classes}), got {label}")
    teacher = images.make_teacher(teacher_model, num_classes,
                                  conversion=images.teacher_conversion(teacher_config))
    shape = (teacher_model.config.in_channels, *teacher_model.config.input_size)
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    cond = torch.tensor([label])
    reference = euler_sample(teacher, noise, 128, cond)
    _, snapshots, history = fit_static_policy(teacher, noise, cond, num_components, iters, seed=seed,
                                              snapshot_every=snapshot_every)
    run_dir.mkdir(parents=True, exist_ok=True)
    images.save_image_grid(torch.cat([reference] + [x for _, x in snapshots]), run_dir / "snapshots.png",
                           nrow=len(snapshots) + 1,
                           label="teacher ODE (128 Euler steps), then the policy rollout at iterations "
                                 + ", ".join(str(it) for it, _ in snapshots))
    plots.plot_loss_curve([{"iter": i, "loss": v} for i, v in enumerate(history)], run_dir / "loss.png",
                          "static GM policy: π-ID loss")
    errors = {it: float((x - reference).square().mean().sqrt()) for it, x in snapshots}
    metrics = {"label": label, "num_components": num_components, "iters": iters,
               "rmse_vs_teacher_ode_by_iteration": errors,
               "note": "snapshots.png: teacher ODE (128 Euler steps) first, then the policy rollout at each snapshot"}
    write_json(run_dir / "metrics.json", metrics)
    return metrics
