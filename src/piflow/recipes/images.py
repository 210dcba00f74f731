"""Image-scale π-Flow: class-conditional DiT teacher → GM/DX policy students (or an x0-regression baseline).

Same run-directory conventions as the 2-D recipe: ``config.yaml``, ``checkpoint.pt`` (resumable), ``teacher/`` or
``student.safetensors``, ``metrics.json`` and PNG sample grids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from piflow.checks import positive_int
from piflow.config import ConfigError, load_config
from piflow.data.images import IMAGE_DATASET_NAMES
from piflow.files import cache_dir
from piflow.models import DiT
from piflow.models.students import PolicyStudent
from piflow.config import Optional_
from piflow.model import PiFlow
from piflow.recipes.common import (as_run, build_piflow, check_dataset, check_settings, config_values,
                                   distill_defaults, finished_distill_run, load_weights, piid_loss_fn, piid_settings,
                                   run_recipe, save_safetensors, seed_initialisation, train_defaults)
from piflow.sampling import euler_sample, euler_trajectory
from piflow.schedule import segment_grid
from piflow.teachers import ClassifierFreeGuidance, NetworkTeacher
from piflow.train.flow_matching import check_time_sampling, flow_matching_loss

NUM_TIMESTEPS = 1000.0
IMAGE_DATASETS = IMAGE_DATASET_NAMES

IMAGE_TEACHER_DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data": {"root": Optional_(str), "image_size": Optional_(int)},
    "model": {"preset": "DiT-T", "patch_size": 2, "hidden_size": 96, "depth": 3, "num_heads": 4},
    "flow_matching": {"batch_size": 64, "time_sampling": "logit_normal", "class_dropout": 0.1},
    "train": train_defaults(iters=2000, ema_start=200),
    "eval": {"num_samples": 1000, "teacher_steps": [1, 2, 4, 8, 32], "guidance_scale": 1.0, "seed": 1234,
             "data_check_samples": 256, "data_distance_warn": 1.2},
}

IMAGE_DISTILL_DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data": {"root": Optional_(str), "image_size": Optional_(int)},
    "teacher": "runs/teacher_digits",
    "student": {"policy": "gmflow", "num_components": 8, "num_nodes": 10, "dx_mode": "grid"},
    "guidance": {"scale": 1.0, "interval": [0.0, 1.0]},
    "distill": distill_defaults(x0_bank_size=4096),
    "train": train_defaults(lr=2e-4),
    "eval": {"num_samples": 1000, "teacher_steps": [32], "student_nfe": [], "temperature": 1.0, "seed": 1234},
}

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
    with config_values("dataset/data"):
        return make_image_dataset(name, split=split, **kwargs)


def build_teacher_model(config: dict, image_shape: tuple[int, ...], num_classes: int) -> DiT:
    spec = config["model"]
    with config_values("model"):
        return DiT.from_preset(spec["preset"], in_channels=image_shape[0], input_size=tuple(image_shape[1:]),
                               patch_size=spec["patch_size"], hidden_size=spec["hidden_size"], depth=spec["depth"],
                               num_heads=spec["num_heads"], num_classes=num_classes)


def train_teacher(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Rectified-flow matching of a class-conditional DiT with label dropout (for CFG)."""
    check_settings(config)
    fm = config["flow_matching"]
    check_time_sampling(fm["time_sampling"])
    if not 0.0 <= fm["class_dropout"] < 1.0:
        raise ConfigError(f"flow_matching.class_dropout must lie in [0, 1), got {fm['class_dropout']}")
    dataset = load_dataset(config, "train")
    images, labels = dataset.tensors()
    seed_initialisation(config)
    model = build_teacher_model(config, tuple(images.shape[1:]), dataset.num_classes)
    batch = int(fm["batch_size"])

    def loss_fn(iteration: int, generator: torch.Generator, backward) -> torch.Tensor:
        index = torch.randint(len(images), (batch,), generator=generator)
        y = labels[index]
        drop = torch.rand(batch, generator=generator) < fm["class_dropout"]
        y = torch.where(drop, torch.full_like(y, dataset.num_classes), y)
        return flow_matching_loss(model, images[index], y, fm["time_sampling"], generator, NUM_TIMESTEPS)

    def finish(result) -> dict:
        result.ema.model.save_pretrained(run_dir / "teacher")
        teacher = make_teacher(result.ema.model, dataset.num_classes, config["eval"]["guidance_scale"])
        gen = torch.Generator().manual_seed(config["eval"]["seed"])
        noise, y = _eval_inputs(16, images.shape[1:], dataset.num_classes, gen)
        grid = euler_sample(teacher, noise, 32, y)
        save_image_grid(grid, run_dir / "samples.png", nrow=8, label="teacher Euler, 32 NFE (classes 0, 1, 2, …)")
        return {"final_loss": result.history[-1]["loss"], **check_samples_near_data(teacher, config, dataset)}

    return run_recipe(config, run_dir, "train-teacher", allow_config_change, model, loss_fn, finish,
                      "teacher flow-matching loss")


def check_samples_near_data(teacher, config: dict, train_data) -> dict:
    """The end-of-training check of `train-teacher`: `eval.data_check_samples` teacher samples (32 Euler steps,
    classes in turn) against the training images, as `piflow.eval.data_distance_ratio` (median nearest-neighbour
    pixel distance to the training set, over that of held-out real images: the test split, or for datasets
    without one the first training images, left out of the reference). Prints a warning above
    `eval.data_distance_warn` (1.2; measured: 1.14 for the bundled digits teacher, whose 32-step samples a
    classifier labels correctly 96 % of the time against 98 % for real test images; 1.26 for the default
    2000-iteration Fashion-MNIST teacher, 68 % against 90 %; 1.8-2.0 for digits teachers after 150-400
    iterations; 3.3-3.8 after 1-50 iterations or for pure noise). Returns the ratio for metrics.json."""
    from piflow.eval import data_distance_ratio

    spec = config["eval"]
    num = positive_int(spec["data_check_samples"], "eval.data_check_samples")
    images, _ = train_data.tensors()
    if config["dataset"] in ("image-folder", "latents"):
        if len(images) < 2:
            return {}
        held_out, images = images[:min(num, len(images) // 2)], images[min(num, len(images) // 2):]
    else:
        held_out = load_dataset(config, "test").tensors()[0][:num]
    noise, y = _eval_inputs(num, images.shape[1:], train_data.num_classes,
                            torch.Generator().manual_seed(spec["seed"] + 1))
    samples = euler_sample(teacher, noise, 32, y).clamp(-1.0, 1.0)
    try:
        ratio = data_distance_ratio(samples, held_out, images)
    except ValueError as error:   # held-out images that duplicate training images give no scale
        print(f"piflow: note: the data check was skipped ({error})")
        return {}
    if ratio > float(spec["data_distance_warn"]):
        print(f"piflow: warning: the teacher's samples are far from the data (nearest-neighbour distance "
              f"{ratio:.2f}x that of held-out images, above eval.data_distance_warn={spec['data_distance_warn']}); "
              f"train longer (train.iters) or a larger model before distilling")
    return {"data_distance_ratio": ratio}


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
    with config_values("student"):
        return PolicyStudent(teacher_model, "dx" if x0_baseline else spec["policy"],
                             num_components=spec["num_components"], num_nodes=1 if x0_baseline else spec["num_nodes"],
                             dx_mode=spec["dx_mode"], num_timesteps=NUM_TIMESTEPS,
                             generator=torch.Generator().manual_seed(config["train"]["seed"]))


def distill(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """π-ID distillation of a DiT teacher into a GM/DX DiT student (data-dependent or data-free), or the x0-regression
    baseline (student.policy=x0)."""
    check_settings(config)
    teacher_model, teacher_config = load_teacher(config["teacher"])
    if teacher_config["dataset"] != config["dataset"]:
        raise ConfigError(f"teacher was trained on {teacher_config['dataset']!r}, but dataset={config['dataset']!r}")
    dataset = load_dataset(config, "train")
    images, labels = dataset.tensors()
    guidance = config["guidance"]
    teacher = make_teacher(teacher_model, dataset.num_classes, guidance["scale"], tuple(guidance["interval"]))
    student = build_student(config, teacher_model)            # checks student.policy
    config = as_run(config, piid_settings(config))
    pf = build_piflow(config, student, teacher)
    batch = int(config["distill"]["batch_size"])
    if config["student"]["policy"] == "x0":
        _x0_grid(pf)                                  # validates the baseline's settings before the run starts

    def draw(generator: torch.Generator):
        index = torch.randint(len(images), (batch,), generator=generator)
        return images[index], labels[index]

    def finish(result) -> dict:
        save_safetensors(result.ema.model.state_dict(), run_dir / "student.safetensors")
        from piflow.recipes import plots

        pf_ema = build_piflow(config, result.ema.model.eval(), teacher)
        gen = torch.Generator().manual_seed(config["eval"]["seed"])
        noise, y = _eval_inputs(32, images.shape[1:], dataset.num_classes, gen)
        with torch.no_grad():
            rows = [euler_sample(teacher, noise, 32, y), euler_sample(teacher, noise, pf.nfe, y),
                    pf_ema.sample(noise, cond=y, temperature=config["eval"]["temperature"])]
        kind = {"gmflow": "GM", "dx": "DX", "x0": "x0-regression"}[config["student"]["policy"]]
        labels_text = ["teacher Euler, 32 NFE", f"teacher Euler, {pf.nfe} NFE", f"{kind} student, {pf.nfe} NFE"]
        plots.plot_image_rows([(text, r[:16]) for text, r in zip(labels_text, rows)], run_dir / "samples.png",
                              title="same noise and class in each column (classes 0, 1, 2, …)")
        return {"final_loss": result.history[-1]["loss"],
                "coupling_rmse_vs_teacher32": float((rows[2] - rows[0]).square().mean().sqrt())}

    if config["student"]["policy"] == "x0":
        loss_fn = _x0_regression_loss(pf, teacher, images.shape[1:], labels, config)
    else:
        loss_fn = piid_loss_fn(pf, draw, batch, bool(config["distill"]["data_free"]), tuple(images.shape[1:]))
    return run_recipe(config, run_dir, "distill", allow_config_change, student, loss_fn, finish, "π-ID loss")


X0_BANK_STEPS = 32


def _x0_grid(pf: PiFlow) -> list[int]:
    """The x0 baseline's grid points in units of 1/32 (a `ConfigError` unless shift = 1 and they are whole)."""
    raw = segment_grid(pf.nfe, pf.settings.final_step_size_scale)
    if pf.settings.shift != 1.0 or any(abs(t * X0_BANK_STEPS - round(t * X0_BANK_STEPS)) > 1e-6 for t in raw):
        raise ConfigError("the x0 baseline (student.policy=x0) needs distill.shift=1 and a segment grid on multiples "
                          "of 1/32 (distill.nfe and distill.final_step_size_scale)")
    return [round(t * X0_BANK_STEPS) for t in raw]


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
    trajectories = euler_trajectory(teacher, noise, X0_BANK_STEPS, bank_labels, batch_size=512)
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

    def loss_fn(iteration: int, generator: torch.Generator, backward) -> torch.Tensor:
        rows = torch.randint(len(endpoints), (batch,), generator=generator)
        point = torch.randint(len(indices), (batch,), generator=generator)
        x = states[point, rows]
        sigma = sigmas[point]
        x0_pred = pf.policy(x, sigma, bank_labels[rows]).x0(x, sigma)
        return 0.5 * (x0_pred - endpoints[rows]).square().flatten(1).mean(1).mean()

    return loss_fn


def load_student(run_dir: Path, overrides=()) -> tuple[PiFlow, dict]:
    config, weights = finished_distill_run(run_dir, IMAGE_DISTILL_DEFAULTS, overrides)
    teacher_model, _ = load_teacher(config["teacher"])
    student = build_student(config, teacher_model)
    load_weights(student, weights, "student weights")
    num_classes = teacher_model.config.num_classes
    guidance = config["guidance"]
    teacher = make_teacher(teacher_model, num_classes, guidance["scale"], tuple(guidance["interval"]))
    return build_piflow(config, student.eval(), teacher), config


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, label: str = "") -> None:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid under `label` (C = 1 or 3; otherwise channel 0)."""
    from piflow.recipes.plots import plot_image_rows

    plot_image_rows([(label, images)], path, ncol=nrow)
