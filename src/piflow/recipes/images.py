"""Image-scale π-Flow: class-conditional DiT teacher → GM/DX policy students (or an x0-regression baseline).

Same run-directory conventions as the 2-D recipe: ``config.yaml``, ``checkpoint.pt`` (resumable), ``teacher/`` or
``student.safetensors``, ``metrics.json`` and PNG sample grids.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from piflow.config import ConfigError, load_config
from piflow.data.images import IMAGE_DATASET_NAMES
from piflow.models import DiT
from piflow.models.students import PolicyStudent
from piflow.piid import segment_grid
from piflow.pipeline import PiFlow
from piflow.recipes.common import (TRAIN_DEFAULTS, build_pipeline, check_dataset, check_settings,
                                   finished_distill_run, load_weights, save_safetensors, seed_initialisation,
                                   start_run, train_config, write_json)
from piflow.sampling import euler_sample
from piflow.teachers import ClassifierFreeGuidance, NetworkTeacher
from piflow.train import train

NUM_TIMESTEPS = 1000.0
IMAGE_DATASETS = IMAGE_DATASET_NAMES

IMAGE_TEACHER_DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data": {"root": None, "image_size": None},
    "model": {"preset": "DiT-T", "patch_size": 2, "hidden_size": 96, "depth": 3, "num_heads": 4},
    "flow_matching": {"batch_size": 64, "time_sampling": "logit_normal", "class_dropout": 0.1},
    "train": dict(TRAIN_DEFAULTS, iters=2000, lr=1e-3, ema_start=200),
    "eval": {"num_samples": 1000, "teacher_steps": [1, 2, 4, 8, 32], "guidance_scale": 1.0, "seed": 1234},
}

IMAGE_DISTILL_DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data": {"root": None, "image_size": None},
    "teacher": "runs/teacher_digits",
    "student": {"policy": "gmflow", "num_components": 8, "num_nodes": 10, "dx_mode": "grid"},
    "guidance": {"scale": 1.0, "interval": [0.0, 1.0]},
    "distill": {"nfe": 4, "data_free": False, "final_step_size_scale": 1.0, "shift": 1.0,
                "num_intermediate_states": 2, "window_substeps": 0, "gm_dropout": 0.05, "loss_scale": 3.0,
                "num_decay_iters": 0, "total_substeps": 128, "batch_size": 64, "x0_bank_size": 4096},
    "train": dict(TRAIN_DEFAULTS, iters=1000, lr=2e-4, ema_start=100),
    "eval": {"num_samples": 1000, "teacher_steps": [32], "student_nfe": [], "temperature": 1.0, "seed": 1234},
}

TIME_SAMPLINGS = ("uniform", "logit_normal")


def is_image_dataset(name: Any) -> bool:
    return isinstance(name, str) and name in IMAGE_DATASETS


def load_dataset(config: dict, split: str = "train"):
    """The configured dataset; `data.root` is the folder (IDX, image-folder) or the file (latents)."""
    from piflow.data import make_image_dataset

    name = config["dataset"]
    check_dataset(name, IMAGE_DATASETS)
    kwargs = {key: value for key, value in config["data"].items() if value is not None}
    if name in ("image-folder", "latents"):
        if "root" not in kwargs:
            raise ConfigError(f"dataset={name} needs data.root (a {'folder' if name == 'image-folder' else 'file'})")
        if name == "image-folder" and "image_size" not in kwargs:
            raise ConfigError("dataset=image-folder needs data.image_size (images are resized and centre-cropped)")
        if name == "latents":
            kwargs["path"] = kwargs.pop("root")
            kwargs.pop("image_size", None)
        if split == "test":
            split = "train"   # no built-in split: evaluation reuses the given data
    return make_image_dataset(name, split=split, **kwargs)


def build_teacher_model(config: dict, image_shape: tuple[int, ...], num_classes: int) -> DiT:
    spec = config["model"]
    return DiT.from_preset(spec["preset"], in_channels=image_shape[0], input_size=tuple(image_shape[1:]),
                           patch_size=spec["patch_size"], hidden_size=spec["hidden_size"], depth=spec["depth"],
                           num_heads=spec["num_heads"], num_classes=num_classes)


def _sample_sigma(batch: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    if mode == "uniform":
        return torch.rand(batch, generator=generator)
    return torch.sigmoid(torch.randn(batch, generator=generator))


def train_teacher(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Rectified-flow matching of a class-conditional DiT with label dropout (for CFG)."""
    check_settings(config)
    fm = config["flow_matching"]
    if fm["time_sampling"] not in TIME_SAMPLINGS:
        raise ConfigError(f"flow_matching.time_sampling must be one of {TIME_SAMPLINGS}, got {fm['time_sampling']!r}")
    if not 0.0 <= fm["class_dropout"] < 1.0:
        raise ConfigError(f"flow_matching.class_dropout must lie in [0, 1), got {fm['class_dropout']}")
    dataset = load_dataset(config, "train")
    images, labels = dataset.tensors()
    seed_initialisation(config)
    model = build_teacher_model(config, tuple(images.shape[1:]), dataset.num_classes)
    settings = train_config(config)
    with start_run(run_dir, config, "train-teacher", allow_config_change) as run:
        return _train_teacher(config, run_dir, dataset, images, labels, model, settings, run)


def _train_teacher(config: dict, run_dir: Path, dataset, images, labels, model: DiT, settings, run) -> dict:
    fm = config["flow_matching"]
    batch = int(fm["batch_size"])

    def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(images), (batch,), generator=generator)
        x0, y = images[index], labels[index]
        drop = torch.rand(batch, generator=generator) < fm["class_dropout"]
        y = torch.where(drop, torch.full_like(y, dataset.num_classes), y)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = _sample_sigma(batch, fm["time_sampling"], generator)
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        u = model((1 - s) * x0 + s * noise, sigma * NUM_TIMESTEPS, y)
        return (u.float() - (noise - x0)).square().mean()

    start = time.perf_counter()
    result = train(model, loss_fn, settings, run_dir, desc="teacher", on_start=run.commit)
    seconds = time.perf_counter() - start
    result.ema.model.save_pretrained(run_dir / "teacher")
    from piflow.recipes import plots

    plots.plot_loss_curve(result.history, run_dir / "loss.png", "teacher flow-matching loss")
    teacher = make_teacher(result.ema.model, dataset.num_classes, config["eval"]["guidance_scale"])
    gen = torch.Generator().manual_seed(config["eval"]["seed"])
    noise, y = _eval_inputs(16, images.shape[1:], dataset.num_classes, gen)
    grid = euler_sample(teacher, noise, 32, y)
    save_image_grid(grid, run_dir / "samples.png", nrow=8, label="teacher Euler, 32 NFE (classes 0, 1, 2, …)")
    metrics = {"train_seconds": seconds, "final_loss": result.history[-1]["loss"]}
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def make_teacher(model: DiT, num_classes: int, guidance_scale: float = 1.0,
                 interval: tuple[float, float] = (0.0, 1.0)):
    model.eval().requires_grad_(False)
    teacher = NetworkTeacher(model, NUM_TIMESTEPS)
    if guidance_scale == 1.0:
        return teacher
    return ClassifierFreeGuidance(teacher, guidance_scale, num_classes, interval)


def load_teacher(run: str) -> tuple[DiT, dict]:
    run_dir = Path(run)
    if not (run_dir / "teacher" / "config.json").is_file():
        raise ConfigError(f"teacher must be a `piflow train-teacher` image run directory holding teacher/; "
                          f"{run_dir} has none")
    config = load_config(IMAGE_TEACHER_DEFAULTS, run_dir / "config.yaml")
    return DiT.from_pretrained(run_dir / "teacher"), config


def _eval_inputs(num: int, shape, num_classes: int, generator: torch.Generator):
    noise = torch.randn(num, *shape, generator=generator)
    labels = torch.arange(num) % num_classes
    return noise, labels


STUDENT_KINDS = ("gmflow", "dx", "x0")


def build_student(config: dict, teacher_model: DiT) -> PolicyStudent:
    """GM or DX policy student; "x0" is the x0-regression baseline: one constant x̂0 per step (a DX policy with a
    single node, i.e. DDIM-style steps), same backbone and initialisation."""
    spec = config["student"]
    if spec["policy"] not in STUDENT_KINDS:
        raise ConfigError(f"student.policy must be one of {STUDENT_KINDS}, got {spec['policy']!r}")
    x0_baseline = spec["policy"] == "x0"
    seed_initialisation(config)
    return PolicyStudent(teacher_model, "dx" if x0_baseline else spec["policy"], num_components=spec["num_components"],
                         num_nodes=1 if x0_baseline else spec["num_nodes"], dx_mode=spec["dx_mode"],
                         num_timesteps=NUM_TIMESTEPS, generator=torch.Generator().manual_seed(config["train"]["seed"]))


def distill(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """π-ID distillation of a DiT teacher into a GM/DX DiT student (data-dependent or data-free)."""
    check_settings(config)
    teacher_model, teacher_config = load_teacher(config["teacher"])
    if teacher_config["dataset"] != config["dataset"]:
        raise ConfigError(f"teacher was trained on {teacher_config['dataset']!r}, but dataset={config['dataset']!r}")
    dataset = load_dataset(config, "train")
    images, labels = dataset.tensors()
    guidance = config["guidance"]
    teacher = make_teacher(teacher_model, dataset.num_classes, guidance["scale"], tuple(guidance["interval"]))
    student = build_student(config, teacher_model)
    pf = build_pipeline(config, student, teacher)
    if config["student"]["policy"] == "x0":
        _x0_grid(pf)                                  # validates the baseline's settings
    settings = train_config(config)
    with start_run(run_dir, config, "distill", allow_config_change) as run:
        return _distill(config, run_dir, dataset, images, labels, teacher, student, pf, settings, run)


def _distill(config: dict, run_dir: Path, dataset, images, labels, teacher, student, pf: PiFlow, settings,
             run) -> dict:
    batch = int(config["distill"]["batch_size"])
    data_free = bool(config["distill"]["data_free"])
    accum = int(config["train"]["grad_accum_steps"])

    def pi_id_loss(iteration: int, generator: torch.Generator):
        index = torch.randint(len(images), (batch,), generator=generator)
        y = labels[index]
        if data_free:
            noise = torch.randn(batch, *images.shape[1:], generator=generator)
            loss = pf.data_free_loss(noise, y, iteration=iteration, generator=generator,
                                     backward=lambda l: (l / accum).backward())
            return loss, True
        return pf(images[index], y, iteration=iteration, generator=generator)

    if config["student"]["policy"] == "x0":
        loss_fn = _x0_regression_loss(pf, teacher, images.shape[1:], labels, config)
    else:
        loss_fn = pi_id_loss
    start = time.perf_counter()
    result = train(student, loss_fn, settings, run_dir, desc="distill", on_start=run.commit)
    seconds = time.perf_counter() - start
    save_safetensors(result.ema.model.state_dict(), run_dir / "student.safetensors")
    from piflow.recipes import plots

    plots.plot_loss_curve(result.history, run_dir / "loss.png", "π-ID loss")
    pf_ema = build_pipeline(config, result.ema.model.eval(), teacher)
    gen = torch.Generator().manual_seed(config["eval"]["seed"])
    noise, y = _eval_inputs(32, images.shape[1:], dataset.num_classes, gen)
    with torch.no_grad():
        rows = [euler_sample(teacher, noise, 32, y), euler_sample(teacher, noise, pf.nfe, y),
                pf_ema.sample(noise, cond=y, temperature=config["eval"]["temperature"])]
    kind = {"gmflow": "GM", "dx": "DX", "x0": "x0-regression"}[config["student"]["policy"]]
    labels_text = ["teacher Euler, 32 NFE", f"teacher Euler, {pf.nfe} NFE", f"{kind} student, {pf.nfe} NFE"]
    plots.plot_image_rows([(text, r[:16]) for text, r in zip(labels_text, rows)], run_dir / "samples.png",
                          title="same noise and class in each column (classes 0, 1, 2, …)")
    metrics = {"train_seconds": seconds, "final_loss": result.history[-1]["loss"],
               "coupling_rmse_vs_teacher32": float((rows[2] - rows[0]).square().mean().sqrt())}
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def teacher_trajectories(teacher, noise: torch.Tensor, labels: torch.Tensor, num_steps: int = 32,
                         batch_size: int = 512) -> torch.Tensor:
    """Teacher Euler ODE states at σ = 1, 1 − 1/n, …, 0 from `noise`: (num_steps + 1, N, C, H, W)."""
    chunks = []
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    with torch.no_grad():
        for start in range(0, len(noise), batch_size):
            x, y = noise[start: start + batch_size], labels[start: start + batch_size]
            states = [x]
            for i in range(num_steps):
                x = x + teacher(x, sigmas[i].expand(len(x)), y) * float(sigmas[i + 1] - sigmas[i])
                states.append(x)
            chunks.append(torch.stack(states))
    return torch.cat(chunks, dim=1)


X0_BANK_STEPS = 32


def _x0_grid(pf: PiFlow) -> list[int]:
    """The x0 baseline's grid points in units of 1/32 (a `ConfigError` unless shift = 1 and they are whole)."""
    raw = segment_grid(pf.nfe, pf.final_step_size_scale)
    if pf.shift != 1.0 or any(abs(t * X0_BANK_STEPS - round(t * X0_BANK_STEPS)) > 1e-6 for t in raw):
        raise ConfigError("the x0 baseline (student.policy=x0) needs distill.shift=1 and a segment grid on multiples "
                          "of 1/32 (distill.nfe and distill.final_step_size_scale)")
    return [round(t * X0_BANK_STEPS) for t in raw]


def cache_dir() -> Path:
    """piflow's cache folder: ``$PIFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/piflow``, else ``~/.cache/piflow``."""
    import os

    if os.environ.get("PIFLOW_CACHE_DIR"):
        return Path(os.environ["PIFLOW_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "piflow"


def _x0_bank(teacher, config: dict, image_shape, labels: torch.Tensor, indices: list[int]):
    """(states at the grid points (G, N, C, H, W), ODE endpoints (N, C, H, W), labels (N,)) of the teacher's
    32-step Euler trajectories from a seeded noise bank — computed once per teacher and settings, then read from
    the cache (``cache_dir()/x0_bank``; safetensors, keyed by a hash of the teacher's files and every input)."""
    import hashlib

    from piflow.files import load_safetensors, save_safetensors

    bank_size = int(config["distill"]["x0_bank_size"])
    seed = int(config["train"]["seed"]) + 99
    key = hashlib.sha256()
    for path in sorted((Path(config["teacher"]) / "teacher").iterdir()):
        if path.is_file():
            key.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    key.update(repr((bank_size, seed, X0_BANK_STEPS, indices, tuple(image_shape), config["guidance"]["scale"],
                     list(config["guidance"]["interval"]))).encode())
    key.update(labels.numpy().tobytes())
    path = cache_dir() / "x0_bank" / f"{key.hexdigest()[:32]}.safetensors"
    if path.is_file():
        try:
            bank = load_safetensors(path, "x0-baseline cache")
            return bank["states"], bank["endpoints"], bank["labels"]
        except (ValueError, KeyError):
            pass                                      # a damaged cache entry is recomputed and replaced
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(bank_size, *image_shape, generator=gen)
    bank_labels = labels[torch.randint(len(labels), (bank_size,), generator=gen)]
    trajectories = teacher_trajectories(teacher, noise, bank_labels, X0_BANK_STEPS)
    states, endpoints = trajectories[torch.tensor(indices)].contiguous(), trajectories[-1].contiguous()
    try:
        save_safetensors(path, {"states": states, "endpoints": endpoints, "labels": bank_labels})
    except OSError as error:                          # an unwritable cache only costs time
        print(f"piflow: warning: could not cache the x0-baseline bank ({error})")
    return states, endpoints, bank_labels


def _x0_regression_loss(pf: PiFlow, teacher, image_shape, labels: torch.Tensor, config: dict):
    """Baseline loss: regress the student's x̂0 at its own grid points on the teacher ODE onto the teacher's ODE
    endpoint from the same noise (the "shortcut" x0 format), with the same budget as π-ID."""
    grid = _x0_grid(pf)
    indices = [X0_BANK_STEPS - g for g in grid]                        # state index of each grid point σ = g/32
    states, endpoints, bank_labels = _x0_bank(teacher, config, image_shape, labels, indices)
    sigmas = torch.tensor([g / X0_BANK_STEPS for g in grid])
    batch = int(config["distill"]["batch_size"])

    def loss_fn(iteration: int, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(len(endpoints), (batch,), generator=generator)
        point = torch.randint(len(indices), (batch,), generator=generator)
        x = states[point, rows]
        sigma = sigmas[point]
        x0_pred = pf.policy(x, sigma, bank_labels[rows]).x0(x, sigma)
        return 0.5 * (x0_pred - endpoints[rows]).square().flatten(1).mean(1).mean()

    return loss_fn


def load_student_pipeline(run_dir: Path, overrides=()) -> tuple[PiFlow, dict]:
    config, weights = finished_distill_run(run_dir, IMAGE_DISTILL_DEFAULTS, overrides)
    teacher_model, _ = load_teacher(config["teacher"])
    student = build_student(config, teacher_model)
    load_weights(student, weights, "student weights")
    num_classes = teacher_model.config.num_classes
    guidance = config["guidance"]
    teacher = make_teacher(teacher_model, num_classes, guidance["scale"], tuple(guidance["interval"]))
    return build_pipeline(config, student.eval(), teacher), config


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, label: str = "") -> None:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid under `label` (C = 1 or 3; otherwise channel 0)."""
    from piflow.recipes.plots import plot_image_rows

    plot_image_rows([(label, images)], path, ncol=nrow)
