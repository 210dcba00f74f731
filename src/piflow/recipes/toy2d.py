"""2-D end to end: train a flow-matching teacher, distil it with π-ID, sample, evaluate against exact references.

Run directories hold ``config.yaml`` (resolved), ``checkpoint.pt`` (resumable training state),
``teacher.safetensors`` or ``student.safetensors`` (EMA weights), ``metrics.json`` and PNG figures.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from piflow.config import ConfigError, load_config
from piflow.data import make_toy_dataset
from piflow.eval import coupling_error, energy_distance, mode_statistics, sliced_wasserstein2
from piflow.models import MLPVelocityModel2D
from piflow.models.students import PolicyStudent
from piflow.pipeline import PiFlow
from piflow.rollout import rollout
from piflow.sampling import FlowMapSDEScheduler, euler_sample, rk4_sample
from piflow.teachers import GaussianMixtureTeacher, NetworkTeacher
from piflow.timewarp import unwarp, warp
from piflow.train import train
from piflow.recipes import plots
from piflow.data import TOY_DATASET_NAMES
from piflow.recipes.common import (TRAIN_DEFAULTS, build_pipeline, check_dataset, check_settings,
                                   finished_distill_run, load_weights, save_safetensors, seed_initialisation,
                                   start_run, train_config, write_json)

NUM_TIMESTEPS = 1000.0

TEACHER_DEFAULTS: dict[str, Any] = {
    "dataset": "checkerboard",
    "model": {"hidden_size": 256, "num_layers": 4},
    "flow_matching": {"batch_size": 1024, "time_sampling": "uniform"},
    "train": dict(TRAIN_DEFAULTS, iters=3000, lr=2e-3, ema_start=200),
    "eval": {"num_samples": 5000, "teacher_steps": [1, 2, 4, 8, 128], "seed": 1234},
}

DISTILL_DEFAULTS: dict[str, Any] = {
    "dataset": "ring8",
    "teacher": "exact",
    "student": {"policy": "gmflow", "num_components": 8, "num_nodes": 10, "dx_mode": "grid", "hidden_size": 256,
                "num_layers": 4},
    "distill": {"nfe": 2, "data_free": False, "final_step_size_scale": 1.0, "shift": 1.0,
                "num_intermediate_states": 2, "window_substeps": 0, "gm_dropout": 0.05, "loss_scale": 3.0,
                "num_decay_iters": 0, "total_substeps": 128, "batch_size": 256},
    "train": dict(TRAIN_DEFAULTS, iters=800, lr=1e-3),
    "eval": {"num_samples": 5000, "teacher_steps": [1, 2, 4, 8, 128], "student_nfe": [], "temperature": 1.0,
             "seed": 1234},
}

TIME_SAMPLINGS = ("uniform", "logit_normal")


# --------------------------------------------------------------------------------------------- teachers
def load_dataset(name: str):
    """The 2-D toy dataset `name`; any other name is a `ConfigError` listing every dataset piflow knows."""
    check_dataset(name)
    if name not in TOY_DATASET_NAMES:
        raise ConfigError(f"dataset {name!r} is an image dataset; this is the 2-D recipe (2-D datasets: "
                          f"{list(TOY_DATASET_NAMES)})")
    return make_toy_dataset(name)


def load_teacher(spec: str, dataset_name: str):
    """'exact' → GaussianMixtureTeacher of a mixture dataset; otherwise a teacher run directory."""
    dataset = load_dataset(dataset_name)
    if spec == "exact":
        if dataset.mixture is None:
            raise ConfigError(f"teacher=exact needs a Gaussian-mixture dataset (ring8, grid25), got {dataset_name!r}")
        mix = dataset.mixture
        return GaussianMixtureTeacher(mix.means, mix.std, mix.weights), None
    run = Path(spec)
    weights, config_path = run / "teacher.safetensors", run / "config.yaml"
    if not weights.is_file() or not config_path.is_file():
        raise ConfigError(f"teacher must be 'exact' or a teacher run directory holding teacher.safetensors and "
                          f"config.yaml (from `piflow train-teacher`); {run} has neither")
    teacher_cfg = load_config(TEACHER_DEFAULTS, config_path)
    if teacher_cfg["dataset"] != dataset_name:
        raise ConfigError(f"teacher in {run} was trained on {teacher_cfg['dataset']!r}, but dataset={dataset_name!r}")
    model = MLPVelocityModel2D(hidden_size=teacher_cfg["model"]["hidden_size"],
                               num_layers=teacher_cfg["model"]["num_layers"])
    load_weights(model, weights, "teacher weights")
    model.eval().requires_grad_(False)
    return NetworkTeacher(model, NUM_TIMESTEPS), model


def train_teacher(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Rectified-flow matching of an MLP on a 2-D dataset; writes teacher.safetensors and metrics."""
    check_settings(config)
    dataset = load_dataset(config["dataset"])
    fm = config["flow_matching"]
    if fm["time_sampling"] not in TIME_SAMPLINGS:
        raise ConfigError(f"flow_matching.time_sampling must be one of {TIME_SAMPLINGS}, got {fm['time_sampling']!r}")
    settings = train_config(config)
    with start_run(run_dir, config, "train-teacher", allow_config_change) as run:
        return _train_teacher(config, run_dir, dataset, settings, run)


def _train_teacher(config: dict, run_dir: Path, dataset, train_settings, run) -> dict:
    fm = config["flow_matching"]
    seed_initialisation(config)
    model = MLPVelocityModel2D(hidden_size=config["model"]["hidden_size"], num_layers=config["model"]["num_layers"])
    batch = int(fm["batch_size"])

    def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
        x0 = dataset.sample(batch, generator)
        noise = torch.randn(x0.shape, generator=generator)
        if fm["time_sampling"] == "uniform":
            sigma = torch.rand(batch, generator=generator)
        else:
            sigma = torch.sigmoid(torch.randn(batch, generator=generator))
        x_t = (1 - sigma[:, None]) * x0 + sigma[:, None] * noise
        u = model(x_t, sigma * NUM_TIMESTEPS)
        return (u - (noise - x0)).square().mean()

    result = train(model, loss_fn, train_settings, run_dir, desc="teacher", on_start=run.commit)
    save_safetensors(result.ema.model.state_dict(), run_dir / "teacher.safetensors")
    plots.plot_loss_curve(result.history, run_dir / "loss.png", "teacher flow-matching loss")
    teacher = NetworkTeacher(result.ema.model, NUM_TIMESTEPS)
    metrics = evaluate_methods(teacher, None, dataset, config["eval"], run_dir)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------------------------- students
def build_student(config: dict, teacher_model: Optional[torch.nn.Module]) -> PolicyStudent:
    spec = config["student"]
    seed_initialisation(config)
    if teacher_model is not None:
        base, init = teacher_model, True
    else:
        base, init = MLPVelocityModel2D(hidden_size=spec["hidden_size"], num_layers=spec["num_layers"]), False
    return PolicyStudent(base, spec["policy"], num_components=spec["num_components"], num_nodes=spec["num_nodes"],
                         dx_mode=spec["dx_mode"], num_timesteps=NUM_TIMESTEPS, init_from_teacher=init,
                         logstd_hidden=256, generator=torch.Generator().manual_seed(config["train"]["seed"]))


def distill(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """π-ID distillation of a 2-D teacher into an MLP policy student; writes student.safetensors and metrics."""
    check_settings(config)
    dataset = load_dataset(config["dataset"])
    teacher, teacher_model = load_teacher(config["teacher"], config["dataset"])
    student = build_student(config, teacher_model)
    pf = build_pipeline(config, student, teacher)
    settings = train_config(config)
    with start_run(run_dir, config, "distill", allow_config_change) as run:
        return _distill(config, run_dir, dataset, teacher, student, pf, settings, run)


def _distill(config: dict, run_dir: Path, dataset, teacher, student, pf: PiFlow, settings, run) -> dict:
    batch = int(config["distill"]["batch_size"])
    data_free = bool(config["distill"]["data_free"])

    def loss_fn(iteration: int, generator: torch.Generator):
        if data_free:
            noise = torch.randn(batch, 2, generator=generator)
            accum = int(config["train"]["grad_accum_steps"])
            return pf.data_free_loss(noise, iteration=iteration, generator=generator,
                                     backward=lambda l: (l / accum).backward()), True
        return pf(dataset.sample(batch, generator), iteration=iteration, generator=generator)

    start = time.perf_counter()
    result = train(student, loss_fn, settings, run_dir, desc="distill", on_start=run.commit)
    train_seconds = time.perf_counter() - start
    save_safetensors(result.ema.model.state_dict(), run_dir / "student.safetensors")
    plots.plot_loss_curve(result.history, run_dir / "loss.png", "π-ID loss")
    pf_ema = build_pipeline(config, result.ema.model, teacher)
    metrics = evaluate_methods(teacher, pf_ema, dataset, config["eval"], run_dir)
    metrics["train_seconds"] = train_seconds
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def load_student_pipeline(run_dir: Path, overrides=()) -> tuple[PiFlow, dict]:
    config, weights = finished_distill_run(run_dir, DISTILL_DEFAULTS, overrides)
    teacher, teacher_model = load_teacher(config["teacher"], config["dataset"])
    student = build_student(config, teacher_model)
    load_weights(student, weights, "student weights")
    student.eval()
    return build_pipeline(config, student, teacher), config


# --------------------------------------------------------------------------------------------- evaluation
def _reference_ode(teacher, noise: torch.Tensor) -> torch.Tensor:
    """High-accuracy teacher ODE solution from `noise` (RK4, 64 steps = 256 evaluations)."""
    return rk4_sample(teacher, noise, 64)


def _sample_metrics(samples: torch.Tensor, reference: torch.Tensor, ode: torch.Tensor, dataset) -> dict:
    gen = torch.Generator().manual_seed(0)
    row = {"sliced_w2": sliced_wasserstein2(samples, reference, generator=gen),
           "energy_distance": energy_distance(samples, reference),
           "coupling_error": coupling_error(samples, ode)}
    if dataset.mixture is not None:
        stats = mode_statistics(samples, dataset.mixture)
        row.update(modes_covered=stats["modes_covered"], num_modes=stats["num_modes"],
                   mode_mass_error=stats["mode_mass_error"], outlier_fraction=stats["outlier_fraction"])
    return row


def evaluate_methods(teacher, pf: Optional[PiFlow], dataset, eval_cfg: dict, run_dir: Optional[Path] = None) -> dict:
    """Metrics of the teacher's Euler sampler at several NFE and (if given) of the student at its NFE(s)."""
    num = int(eval_cfg["num_samples"])
    gen = torch.Generator().manual_seed(int(eval_cfg["seed"]))
    reference = dataset.sample(num, gen)
    noise = torch.randn(num, 2, generator=gen)
    ode = _reference_ode(teacher, noise)
    rows: dict[str, dict] = {"teacher ODE (RK4, 256 NFE)": dict(_sample_metrics(ode, reference, ode, dataset), nfe=256)}
    panels = [("data", reference.numpy()), ("teacher ODE", ode.numpy())]
    for steps in eval_cfg["teacher_steps"]:
        samples = euler_sample(teacher, noise, int(steps))
        rows[f"teacher Euler {steps}"] = dict(_sample_metrics(samples, reference, ode, dataset), nfe=int(steps))
        if int(steps) in (1, 2, 4):
            panels.append((f"teacher Euler {steps} NFE", samples.numpy()))
    if pf is not None:
        nfes = sorted({pf.nfe, *map(int, eval_cfg["student_nfe"])})
        temperature = eval_cfg["temperature"]
        for nfe in nfes:
            samples = pf.sample(noise, nfe=nfe, temperature=temperature)
            label = f"student {pf.policy_kind} {nfe}" + ("" if nfe == pf.nfe else " (elastic)")
            rows[label] = dict(_sample_metrics(samples, reference, ode, dataset), nfe=nfe)
            if nfe == pf.nfe:
                if pf.nfe not in {int(s) for s in eval_cfg["teacher_steps"]}:
                    panels.append((f"teacher Euler {nfe} NFE", euler_sample(teacher, noise, nfe).numpy()))
                panels.append((f"π-Flow student {nfe} NFE", samples.numpy()))
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        plots.plot_sample_panels(panels, run_dir / "samples.png")
        if pf is not None:
            _trajectory_figure(teacher, pf, dataset, run_dir / "trajectories.png")
    return {"rows": rows}


def policy_path(pf: PiFlow, noise: torch.Tensor, nfe: int) -> tuple[np.ndarray, np.ndarray]:
    """The student's full substep path (T, N, 2) and its network-evaluation points (nfe + 1, N, 2)."""
    scheduler = FlowMapSDEScheduler(pf.shift, pf.final_step_size_scale)
    scheduler.set_timesteps(nfe)
    total = pf.segment_kwargs["total_substeps"]
    x, path, points = noise, [noise], [noise]
    with torch.no_grad():
        for i in range(nfe):
            sigma_src = float(scheduler.sigmas[i])
            policy = pf.policy(x, torch.full((x.shape[0],), sigma_src), None)
            tau_src, tau_dst = unwarp(sigma_src, pf.shift), unwarp(float(scheduler.sigmas[i + 1]), pf.shift)
            count = max(round((tau_src - tau_dst) * total), 1)
            sigmas = [warp(tau_src - (tau_src - tau_dst) * j / count, pf.shift) for j in range(count + 1)]
            sigmas[0] = sigma_src
            for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
                x = rollout(policy, x, s0, s1, total_substeps=total, shift=pf.shift)
                path.append(x)
            points.append(x)
    return torch.stack(path).numpy(), torch.stack(points).numpy()


def _trajectory_figure(teacher, pf: PiFlow, dataset, path: Path, num_paths: int = 12) -> None:
    noise = torch.randn(num_paths, 2, generator=torch.Generator().manual_seed(7))
    sigmas = torch.linspace(1, 0, 129)
    x, teacher_path = noise, [noise]
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        x = x + teacher(x, s0.expand(num_paths), None) * (s1 - s0)
        teacher_path.append(x)
    student_path, points = policy_path(pf, noise, pf.nfe)
    background = dataset.sample(3000, torch.Generator().manual_seed(3)).numpy()
    plots.plot_trajectories(torch.stack(teacher_path).numpy(), student_path, path, points, background=background)


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table of evaluation rows."""
    has_modes = any("modes_covered" in r for r in rows.values())
    header = "| method | NFE | sliced W2 ↓ | energy dist. ↓ | coupling err. ↓ |"
    sep = "|---|---:|---:|---:|---:|"
    if has_modes:
        header += " modes | mode mass err. ↓ |"
        sep += "---:|---:|"
    lines = [header, sep]
    for name, r in rows.items():
        line = (f"| {name} | {r['nfe']} | {r['sliced_w2']:.4f} | {r['energy_distance']:.4f} | "
                f"{r['coupling_error']:.4f} |")
        if has_modes:
            line += f" {r.get('modes_covered', '-')}/{r.get('num_modes', '-')} | {r.get('mode_mass_error', 0):.3f} |"
        lines.append(line)
    return "\n".join(lines)
