"""2-D end to end: train a teacher (flow matching, or a diffusion model: ``objective``), distil it with π-ID, sample,
evaluate against exact references.

Run directories hold ``config.yaml`` (resolved), ``checkpoint.pt`` (resumable training state),
``teacher.safetensors`` or ``student.safetensors`` (EMA weights), ``metrics.json`` and PNG figures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from piflow.config import OBJECTIVE_DEFAULTS, ConfigError, load_config
from piflow.data import make_toy_dataset
from piflow.eval import coupling_error, energy_distance, mode_statistics, sliced_wasserstein2
from piflow.models import MLPVelocityModel2D
from piflow.models.students import PolicyStudent
from piflow.model import PiFlow
from piflow.rollout import num_substeps, rollout
from piflow.sampling import FlowMapSDESchedule, euler_sample, euler_trajectory, rk4_sample
from piflow.teachers import GaussianMixtureTeacher
from piflow.timewarp import NUM_TIMESTEPS, unwarp, warp
from piflow.diffusion import DiffusionTeacher
from piflow.train.flow_matching import check_time_sampling, diffusion_conversion, network_teacher, teacher_loss
from piflow.recipes import plots
from piflow.data import TOY_DATASET_NAMES
from piflow.files import save_safetensors
from piflow.methods import DistillSetup, method_sections, student_name
from piflow.recipes.common import (check_dataset, check_settings, config_values, distill_defaults, distill_run,
                                   finished_distill_run, load_distilled, load_weights, missing_teacher_run,
                                   run_recipe, seed_initialisation, train_defaults)


TEACHER_DEFAULTS: dict[str, Any] = {
    "dataset": "checkerboard",
    "model": {"hidden_size": 256, "num_layers": 4},
    "flow_matching": {"batch_size": 1024, "time_sampling": "uniform"},
    "objective": dict(OBJECTIVE_DEFAULTS),
    "train": train_defaults(iters=3000, lr=2e-3, ema_start=200),
    "eval": {"num_samples": 5000, "teacher_steps": [1, 2, 4, 8, 128], "seed": 1234},
}

DISTILL_DEFAULTS: dict[str, Any] = {
    "dataset": "ring8",
    "teacher": "exact",
    **method_sections(),
    "student": {"policy": "gmflow", "num_components": 8, "num_nodes": 10, "dx_mode": "grid", "hidden_size": 256,
                "num_layers": 4},
    "distill": distill_defaults(nfe=2, batch_size=256),
    "train": train_defaults(iters=800),
    "eval": {"num_samples": 5000, "teacher_steps": [1, 2, 4, 8, 128], "student_nfe": [], "temperature": 1.0,
             "seed": 1234},
}

# --------------------------------------------------------------------------------------------- teachers
def load_dataset(name: str):
    """The 2-D toy dataset `name`; any other name is a `ConfigError` listing every dataset piflow knows."""
    check_dataset(name)
    if name not in TOY_DATASET_NAMES:
        raise ConfigError(f"dataset {name!r} is an image dataset; this is the 2-D recipe (2-D datasets: "
                          f"{list(TOY_DATASET_NAMES)})")
    return make_toy_dataset(name)


def load_teacher(spec: str, dataset_name: str):
    """(teacher, its network or None): 'exact' → GaussianMixtureTeacher of a mixture dataset; otherwise a teacher
    run directory (a `NetworkTeacher`, or a `DiffusionTeacher` for a run trained with a diffusion objective)."""
    dataset = load_dataset(dataset_name)
    if spec == "exact":
        if dataset.mixture is None:
            raise ConfigError(f"teacher=exact needs a Gaussian-mixture dataset (ring8, grid25), got {dataset_name!r}")
        mix = dataset.mixture
        return GaussianMixtureTeacher(mix.means, mix.std, mix.weights), None
    run = Path(spec)
    weights, config_path = run / "teacher.safetensors", run / "config.yaml"
    if not weights.is_file() or not config_path.is_file():
        raise missing_teacher_run(run, "teacher.safetensors and config.yaml", kinds="'exact' or ")
    teacher_cfg = load_config(TEACHER_DEFAULTS, config_path)
    if teacher_cfg["dataset"] != dataset_name:
        raise ConfigError(f"teacher in {run} was trained on {teacher_cfg['dataset']!r}, but dataset={dataset_name!r}")
    model = MLPVelocityModel2D(hidden_size=teacher_cfg["model"]["hidden_size"],
                               num_layers=teacher_cfg["model"]["num_layers"])
    load_weights(model, weights, "teacher weights")
    model.eval().requires_grad_(False)
    return network_teacher(model, diffusion_conversion(teacher_cfg["objective"])), model


def train_teacher(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Rectified-flow matching (or the ``objective``'s diffusion training) of an MLP on a 2-D dataset; writes
    teacher.safetensors and metrics."""
    check_settings(config)
    dataset = load_dataset(config["dataset"])
    fm = config["flow_matching"]
    check_time_sampling(fm["time_sampling"])
    conversion = diffusion_conversion(config["objective"])
    seed_initialisation(config)
    model = MLPVelocityModel2D(hidden_size=config["model"]["hidden_size"], num_layers=config["model"]["num_layers"])
    batch = int(fm["batch_size"])

    def loss_fn(iteration: int, generator: torch.Generator, backward) -> torch.Tensor:
        return teacher_loss(lambda x, t, cond: model(x, t), dataset.sample(batch, generator), None,
                            fm["time_sampling"], generator, conversion)

    def finish(result) -> dict:
        save_safetensors(run_dir / "teacher.safetensors", result.ema.model.state_dict())
        return evaluate_methods(network_teacher(result.ema.model, conversion), None, dataset, config["eval"],
                                run_dir)

    return run_recipe(config, run_dir, "train-teacher", allow_config_change, model, loss_fn, finish,
                      "teacher flow-matching loss" if conversion is None
                      else f"teacher denoising loss ({conversion.prediction_type})")


# --------------------------------------------------------------------------------------------- students
def _backbone(config: dict) -> MLPVelocityModel2D:
    return MLPVelocityModel2D(hidden_size=config["student"]["hidden_size"], num_layers=config["student"]["num_layers"])


def build_student(config: dict, teacher_model: Optional[torch.nn.Module], policy: Optional[str] = None,
                  num_nodes: Optional[int] = None, conversion: Optional[DiffusionTeacher] = None) -> PolicyStudent:
    """The MLP policy student (``student`` section; `policy`/`num_nodes` override it): a copy of the teacher's
    network (converted by `conversion` for a diffusion-trained teacher), or a fresh MLP with the no-teacher head
    initialisation for the exact teacher."""
    spec = config["student"]
    seed_initialisation(config)
    if teacher_model is not None:
        base, init = teacher_model, True
    else:
        base, init = _backbone(config), False
    with config_values("student"):
        return PolicyStudent(base, policy or spec["policy"], num_components=spec["num_components"],
                             num_nodes=spec["num_nodes"] if num_nodes is None else num_nodes,
                             dx_mode=spec["dx_mode"], num_timesteps=NUM_TIMESTEPS, init_from_teacher=init,
                             logstd_hidden=256, generator=torch.Generator().manual_seed(config["train"]["seed"]),
                             diffusion=conversion)


def distill_setup(config: dict, dataset=None) -> DistillSetup:
    """What every method needs of a 2-D run: the teacher (exact or a teacher run), MLP backbones, the data
    (`dataset`, or the config's)."""
    dataset = load_dataset(config["dataset"]) if dataset is None else dataset
    teacher, teacher_model = load_teacher(config["teacher"], config["dataset"])
    conversion = teacher.without_model() if isinstance(teacher, DiffusionTeacher) else None
    seed_initialisation(config)

    def policy_student(policy: str, num_nodes: int) -> PolicyStudent:
        return build_student(config, teacher_model, policy, num_nodes, conversion)

    return DistillSetup(config=config, teacher=teacher, teacher_model=teacher_model,
                        new_backbone=lambda: _backbone(config), policy_student=policy_student, shape=(2,),
                        draw_data=lambda generator, batch: (dataset.sample(batch, generator), None),
                        draw_cond=lambda generator, batch: None, num_timesteps=NUM_TIMESTEPS,
                        teacher_conversion=conversion)


def distill(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Distillation of a 2-D teacher by the configured method (π-ID by default) into an MLP student; writes
    student.safetensors and metrics (the 2-D evaluation table and figures)."""
    check_settings(config)
    dataset = load_dataset(config["dataset"])
    setup = distill_setup(config, dataset)
    return distill_run(run_dir, allow_config_change, setup,
                       lambda sampler: evaluate_methods(setup.teacher, sampler, dataset, config["eval"], run_dir,
                                                        student_name(config)))


def load_student(run_dir: Path, overrides=()) -> tuple[Any, dict]:
    """(sampler, config) of a finished 2-D distillation run of any method (`PiFlow` for π-ID and x0)."""
    config, weights = finished_distill_run(run_dir, DISTILL_DEFAULTS, overrides)
    return load_distilled(distill_setup(config), weights), config


# --------------------------------------------------------------------------------------------- evaluation
def reference_ode(teacher, noise: torch.Tensor) -> torch.Tensor:
    """High-accuracy teacher ODE solution from `noise` (RK4, 64 steps = 256 evaluations)."""
    return rk4_sample(teacher, noise, 64)


def sample_metrics(samples: torch.Tensor, reference: torch.Tensor, ode: torch.Tensor, dataset) -> dict:
    gen = torch.Generator().manual_seed(0)
    row = {"sliced_w2": sliced_wasserstein2(samples, reference, generator=gen),
           "energy_distance": energy_distance(samples, reference),
           "coupling_error": coupling_error(samples, ode)}
    if dataset.mixture is not None:
        stats = mode_statistics(samples, dataset.mixture)
        row.update(modes_covered=stats["modes_covered"], num_modes=stats["num_modes"],
                   mode_mass_error=stats["mode_mass_error"], outlier_fraction=stats["outlier_fraction"])
    return row


def evaluate_methods(teacher, pf: Any, dataset, eval_cfg: dict, run_dir: Optional[Path] = None,
                     name: Optional[str] = None) -> dict:
    """Metrics of the teacher's Euler sampler at several NFE and (if given) of the student — a `PiFlow` or a
    method's `FewStepSampler`, rows named "student `name` NFE" (`methods.student_name`; default: the policy) —
    at its NFE(s)."""
    num = int(eval_cfg["num_samples"])
    gen = torch.Generator().manual_seed(int(eval_cfg["seed"]))
    reference = dataset.sample(num, gen)
    noise = torch.randn(num, 2, generator=gen)
    ode = reference_ode(teacher, noise)
    rows: dict[str, dict] = {"teacher ODE (RK4, 256 NFE)": dict(sample_metrics(ode, reference, ode, dataset), nfe=256)}
    panels = [("data", reference.numpy()), ("teacher ODE", ode.numpy())]
    for steps in eval_cfg["teacher_steps"]:
        samples = euler_sample(teacher, noise, int(steps))
        rows[f"teacher Euler {steps}"] = dict(sample_metrics(samples, reference, ode, dataset), nfe=int(steps))
        if int(steps) in (1, 2, 4):
            panels.append((f"teacher Euler {steps} NFE", samples.numpy()))
    if pf is not None:
        nfes = sorted({pf.nfe, *map(int, eval_cfg["student_nfe"])})
        temperature = eval_cfg["temperature"]
        for nfe in nfes:
            samples = pf.sample(noise, nfe=nfe, temperature=temperature, generator=gen)
            label = f"student {name or pf.policy_kind} {nfe}" + ("" if nfe == pf.nfe else " (elastic)")
            rows[label] = dict(sample_metrics(samples, reference, ode, dataset), nfe=nfe)
            if nfe == pf.nfe:
                if pf.nfe not in {int(s) for s in eval_cfg["teacher_steps"]}:
                    panels.append((f"teacher Euler {nfe} NFE", euler_sample(teacher, noise, nfe).numpy()))
                panels.append((f"π-Flow student {nfe} NFE", samples.numpy()))
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        plots.plot_sample_panels(panels, run_dir / "samples.png")
        if isinstance(pf, PiFlow):          # policy paths of the π-ID / x0 students (deterministic steps)
            _trajectory_figure(teacher, pf, dataset, run_dir / "trajectories.png")
    return {"rows": rows}


def policy_path(pf: PiFlow, noise: torch.Tensor, nfe: int) -> tuple[np.ndarray, np.ndarray]:
    """The student's full substep path (T, N, 2) and its network-evaluation points (nfe + 1, N, 2)."""
    shift = pf.settings.shift
    scheduler = FlowMapSDESchedule(shift, pf.settings.final_step_size_scale)
    scheduler.set_timesteps(nfe)
    total = pf.settings.total_substeps
    x, path, points = noise, [noise], [noise]
    with torch.no_grad():
        for i in range(nfe):
            sigma_src = float(scheduler.sigmas[i])
            policy = pf.policy(x, torch.full((x.shape[0],), sigma_src), None)
            tau_src, tau_dst = unwarp(sigma_src, shift), unwarp(float(scheduler.sigmas[i + 1]), shift)
            count = int(num_substeps(torch.tensor(tau_src), torch.tensor(tau_dst), total))
            sigmas = [warp(tau_src - (tau_src - tau_dst) * j / count, shift) for j in range(count + 1)]
            sigmas[0] = sigma_src
            for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
                x = rollout(policy, x, s0, s1, total_substeps=total, shift=shift)
                path.append(x)
            points.append(x)
    return torch.stack(path).numpy(), torch.stack(points).numpy()


def _trajectory_figure(teacher, pf: PiFlow, dataset, path: Path, num_paths: int = 12) -> None:
    noise = torch.randn(num_paths, 2, generator=torch.Generator().manual_seed(7))
    teacher_path = euler_trajectory(teacher, noise, 128)
    student_path, points = policy_path(pf, noise, pf.nfe)
    background = dataset.sample(3000, torch.Generator().manual_seed(3)).numpy()
    plots.plot_trajectories(teacher_path.numpy(), student_path, path, points, background=background)


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
