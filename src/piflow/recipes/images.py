"""Image-scale π-Flow: class-conditional DiT teacher (flow matching, or a diffusion model: ``objective``) → GM/DX
policy students (or an x0-regression, DMD2 or MeanFlow baseline).

Same run-directory conventions as the 2-D recipe: ``config.yaml``, ``checkpoint.pt`` (resumable), ``teacher/`` or
``student.safetensors``, ``metrics.json`` and PNG sample grids.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch

from piflow.bundled import teacher_source
from piflow.checks import positive_int
from piflow.config import OBJECTIVE_DEFAULTS, ConfigError, load_config
from piflow.data.images import IMAGE_DATASET_NAMES, LABELS_ONLY
from piflow.models import DiT, UNet, load_image_network, read_image_network_config
from piflow.models.students import PolicyStudent
from piflow.config import Optional_
from piflow.methods import DistillSetup, method_sections
from piflow.recipes.common import (check_dataset, check_settings, config_values, distill_defaults, distill_run,
                                   finished_distill_run, load_distilled, missing_teacher_run, run_recipe,
                                   seed_initialisation, train_defaults)
from piflow.sampling import euler_sample
from piflow.teachers import ClassifierFreeGuidance
from piflow.train.flow_matching import check_time_sampling, diffusion_conversion, network_teacher, teacher_loss
from piflow.timewarp import NUM_TIMESTEPS

IMAGE_DATASETS = IMAGE_DATASET_NAMES + (LABELS_ONLY,)

IMAGE_TEACHER_DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data": {"root": Optional_(str), "image_size": Optional_(int)},
    # type: dit (preset, patch_size, hidden_size, depth, num_heads) or unet (channels, channel_mults,
    # num_res_blocks, attention_levels, num_heads, groups, dropout); the keys of the other type are unused
    "model": {"type": "dit", "preset": "DiT-T", "patch_size": 2, "hidden_size": 96, "depth": 3, "num_heads": 4,
              "channels": 32, "channel_mults": [1, 2, 4], "num_res_blocks": 2, "attention_levels": [2], "groups": 8,
              "dropout": 0.0},
    "flow_matching": {"batch_size": 64, "time_sampling": "logit_normal", "class_dropout": 0.1},
    "objective": dict(OBJECTIVE_DEFAULTS),
    "train": train_defaults(iters=2000, ema_start=200),
    "eval": {"num_samples": 1000, "teacher_steps": [1, 2, 4, 8, 32], "guidance_scale": 1.0, "seed": 1234,
             "data_check_samples": 256, "data_distance_warn": 1.2},
}

IMAGE_DISTILL_DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "data": {"root": Optional_(str), "image_size": Optional_(int)},
    "teacher": "runs/teacher_digits",
    "teacher_layout": "auto",
    "teacher_input_size": Optional_(int),      # latent side of a checkpoint without a stored position table
    "vae": Optional_(str),
    **method_sections(),
    "student": {"policy": "gmflow", "num_components": 8, "num_nodes": 10, "dx_mode": "grid", "logstd_hidden": 1024,
                "gradient_checkpointing": False},
    "guidance": {"scale": 1.0, "interval": [0.0, 1.0]},
    "distill": distill_defaults(),
    "train": train_defaults(lr=2e-4),
    "eval": {"num_samples": 1000, "teacher_steps": [32], "student_nfe": [], "temperature": 1.0, "seed": 1234},
}

def is_image_dataset(name: Any) -> bool:
    return isinstance(name, str) and name in IMAGE_DATASETS


def load_dataset(config: dict, split: str = "train"):
    """The configured dataset; `data.root` is the folder (IDX, image-folder) or the file or shard folder
    (latents)."""
    from piflow.data import make_image_dataset

    name = config["dataset"]
    check_dataset(name, IMAGE_DATASETS)
    if name == LABELS_ONLY:
        raise ConfigError(f"dataset={LABELS_ONLY} holds class labels only (data-free distillation of a teacher); "
                          f"training a teacher or data-dependent distillation needs images or latents "
                          f"(dataset=latents, data.root=<a `piflow encode-images` folder>)")
    kwargs = {key: value for key, value in config["data"].items() if value is not None}
    if name in ("image-folder", "latents"):
        if "root" not in kwargs:
            what = "folder" if name == "image-folder" else "file or a folder of latent shards"
            raise ConfigError(f"dataset={name} needs data.root (a {what})")
        if name == "image-folder" and "image_size" not in kwargs:
            raise ConfigError("dataset=image-folder needs data.image_size (images are resized and centre-cropped)")
        if name == "latents":
            kwargs["path"] = kwargs.pop("root")
            kwargs.pop("image_size", None)
        if split == "test":
            split = "train"   # no built-in split: evaluation reuses the given data
    with config_values("dataset/data"):
        return make_image_dataset(name, split=split, **kwargs)


MODEL_TYPES = ("dit", "unet")


def build_teacher_model(config: dict, image_shape: tuple[int, ...], num_classes: int) -> Union[DiT, UNet]:
    """A fresh class-conditional network of the ``model`` section (a DiT or a U-Net) for images of `image_shape`."""
    spec = config["model"]
    if spec["type"] not in MODEL_TYPES:
        raise ConfigError(f"model.type must be one of {MODEL_TYPES}, got {spec['type']!r}")
    with config_values("model"):
        if spec["type"] == "unet":
            return UNet(in_channels=image_shape[0], input_size=tuple(image_shape[1:]), channels=spec["channels"],
                        channel_mults=tuple(spec["channel_mults"]), num_res_blocks=spec["num_res_blocks"],
                        attention_levels=tuple(spec["attention_levels"]), num_heads=spec["num_heads"],
                        groups=spec["groups"], dropout=spec["dropout"], num_classes=num_classes)
        return DiT.from_preset(spec["preset"], in_channels=image_shape[0], input_size=tuple(image_shape[1:]),
                               patch_size=spec["patch_size"], hidden_size=spec["hidden_size"], depth=spec["depth"],
                               num_heads=spec["num_heads"], num_classes=num_classes)


def train_teacher(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Rectified-flow matching (or the ``objective``'s diffusion training) of a class-conditional DiT or U-Net with
    label dropout (for CFG)."""
    check_settings(config)
    fm = config["flow_matching"]
    check_time_sampling(fm["time_sampling"])
    conversion = diffusion_conversion(config["objective"])
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
        return teacher_loss(model, images[index], y, fm["time_sampling"], generator, conversion)

    def finish(result) -> dict:
        result.ema.model.save_pretrained(run_dir / "teacher")
        teacher = make_teacher(result.ema.model, dataset.num_classes, config["eval"]["guidance_scale"],
                               conversion=conversion)
        gen = torch.Generator().manual_seed(config["eval"]["seed"])
        noise, y = _eval_inputs(16, images.shape[1:], dataset.num_classes, gen)
        grid = euler_sample(teacher, noise, 32, y)
        save_image_grid(grid, run_dir / "samples.png", nrow=8, label="teacher Euler, 32 NFE (classes 0, 1, 2, …)")
        return {"final_loss": result.history[-1]["loss"], **check_samples_near_data(teacher, config, dataset)}

    return run_recipe(config, run_dir, "train-teacher", allow_config_change, model, loss_fn, finish,
                      "teacher flow-matching loss" if conversion is None
                      else f"teacher denoising loss ({conversion.prediction_type})")


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
    samples, _ = data_check_samples(teacher, config, num, images.shape[1:], train_data.num_classes)
    try:
        ratio = data_distance_ratio(samples, held_out, images)
    except ValueError as error:   # held-out images that duplicate training images give no scale
        print(f"piflow: note: the data check was skipped ({error})", file=sys.stderr)
        return {}
    if ratio > float(spec["data_distance_warn"]):
        print(f"piflow: warning: the teacher's samples are far from the data (nearest-neighbour distance "
              f"{ratio:.2f}x that of held-out images, above eval.data_distance_warn={spec['data_distance_warn']}); "
              f"train longer (train.iters) or a larger model before distilling", file=sys.stderr)
    return {"data_distance_ratio": ratio}


def data_check_samples(teacher, config: dict, num: int, shape, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples (num, *shape) in [-1, 1], labels (num,)) of the teacher's data check: 32 Euler steps from the noise
    of seed ``eval.seed`` + 1, classes in turn (0, 1, 2, …)."""
    noise, y = _eval_inputs(num, shape, num_classes, torch.Generator().manual_seed(config["eval"]["seed"] + 1))
    with torch.no_grad():
        return euler_sample(teacher, noise, 32, y).clamp(-1.0, 1.0), y


def make_teacher(model: DiT, num_classes: int, guidance_scale: float = 1.0,
                 interval: tuple[float, float] = (0.0, 1.0), conversion=None):
    """The (guided) teacher of a DiT: its velocity, or for a diffusion-trained DiT its `conversion`
    (`teacher_conversion`) around it; CFG with the null class `num_classes` unless `guidance_scale` is 1."""
    model.eval().requires_grad_(False)
    teacher = network_teacher(model, conversion)
    if guidance_scale == 1.0:
        return teacher
    return ClassifierFreeGuidance(teacher, guidance_scale, num_classes, interval)


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


def load_teacher(source: str, layout: str = "auto",
                 input_size: Optional[int] = None) -> tuple[Union[DiT, UNet], Optional[dict]]:
    """(network, its `train-teacher` config or None) of ``teacher``: a `piflow train-teacher` run (a DiT or a U-Net;
    a bundled teacher's name, `piflow.bundled`), a DiT folder
    (`DiT.save_pretrained` / `piflow convert-checkpoint --out`) or a published checkpoint file (SiT, REPA, the
    authors' ImageNet teachers; read safely and converted by `piflow.models.imported` with `layout`)."""
    path = Path(teacher_source(source))
    if (path / "teacher" / "config.json").is_file():   # float32, as trained (a bundled teacher is stored in float16)
        return (load_image_network(path / "teacher", dtype=torch.float32),
                load_config(IMAGE_TEACHER_DEFAULTS, path / "config.yaml"))
    if (path / "config.json").is_file():
        with config_values("teacher"):
            return load_image_network(path), None
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        from piflow.models.imported import LAYOUTS, import_teacher

        if layout not in LAYOUTS:
            raise ConfigError(f"teacher_layout must be one of {LAYOUTS}, got {layout!r}")
        return import_teacher(path, layout, input_size=input_size), None
    raise missing_teacher_run(path, "teacher/config.json (an image teacher)",
                              kinds=f"a DiT folder (config.json), a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) "
                                    f"or ")


def teacher_conversion(teacher_config: Optional[dict]):
    """The `DiffusionTeacher` conversion of a teacher run trained with a diffusion ``objective`` (None for flow
    teachers, DiT folders and checkpoint files, which are velocity networks)."""
    return None if teacher_config is None else diffusion_conversion(teacher_config["objective"])


def _eval_inputs(num: int, shape, num_classes: int, generator: torch.Generator):
    noise = torch.randn(num, *shape, generator=generator)
    labels = torch.arange(num) % num_classes
    return noise, labels


STUDENT_KINDS = ("gmflow", "dx", "x0")        # x0: the spelling of ``method: x0`` before methods existed


def build_student(config: dict, teacher_model: DiT, policy: Optional[str] = None,
                  num_nodes: Optional[int] = None, conversion=None) -> PolicyStudent:
    """A GM or DX policy student on a copy of the teacher's DiT (``student`` section; `policy`/`num_nodes`
    override it; `conversion`: the teacher's `teacher_conversion`)."""
    spec = config["student"]
    seed_initialisation(config)
    with config_values("student"):
        student = PolicyStudent(teacher_model, policy or spec["policy"], num_components=spec["num_components"],
                                num_nodes=spec["num_nodes"] if num_nodes is None else num_nodes,
                                dx_mode=spec["dx_mode"], num_timesteps=NUM_TIMESTEPS,
                                logstd_hidden=spec["logstd_hidden"],
                                generator=torch.Generator().manual_seed(config["train"]["seed"]), diffusion=conversion)
    student.backbone.gradient_checkpointing = bool(spec["gradient_checkpointing"])
    return student


def teacher_identity(source: str) -> bytes:
    """The SHA-256 of the teacher's weight and config files (caches of its samples are keyed by it)."""
    import hashlib

    path = Path(teacher_source(source))
    folder = path / "teacher" if (path / "teacher").is_dir() else path
    key = hashlib.sha256()
    for item in (sorted(folder.iterdir()) if folder.is_dir() else [path]):
        if item.is_file():
            digest = hashlib.sha256()
            with open(item, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            key.update(item.name.encode() + digest.digest())
    return key.digest()


def distill_setup(config: dict, load_data: bool = True) -> DistillSetup:
    """What every method needs of an image run: the (guided) DiT teacher, its network, fresh DiTs of its
    architecture, the training images and labels. With `load_data` False (sampling a finished run) the training
    set is read only if a training draw asks for it — a finished ImageNet run samples without loading its latents."""
    if config["student"]["policy"] not in STUDENT_KINDS:
        raise ConfigError(f"student.policy must be one of {STUDENT_KINDS}, got {config['student']['policy']!r}")
    teacher_model, teacher_config = load_teacher(config["teacher"], config["teacher_layout"],
                                                 config["teacher_input_size"])
    if teacher_config is not None and teacher_config["dataset"] != config["dataset"]:
        raise ConfigError(f"teacher was trained on {teacher_config['dataset']!r}, but dataset={config['dataset']!r}")
    num_classes = int(teacher_model.config.num_classes)
    shape = (teacher_model.config.in_channels, *teacher_model.config.input_size)
    loaded: dict = {}

    def training_data():
        """(the dataset or None for labels only, its labels (N,)), read and checked once."""
        if not loaded:
            if config["dataset"] == LABELS_ONLY:
                loaded["data"] = (None, torch.arange(max(num_classes, 1)))    # uniform: every class equally often
            else:
                dataset = load_dataset(config, "train")
                if tuple(dataset.image_shape) != shape:
                    raise ConfigError(f"the dataset's items have shape {tuple(dataset.image_shape)}, but the teacher "
                                      f"takes {shape}")
                loaded["data"] = (dataset, dataset.labels)
        return loaded["data"]

    if config["dataset"] == LABELS_ONLY and not config["distill"]["data_free"]:
        raise ConfigError(f"dataset={LABELS_ONLY} has no images: set distill.data_free=true (data-free π-ID "
                          f"needs only labels), or dataset=latents with data.root=<a `piflow encode-images` "
                          f"folder> for data-dependent distillation")
    if load_data:
        training_data()                                 # errors up front, before a run directory is touched
    guidance = config["guidance"]
    conversion = teacher_conversion(teacher_config)
    teacher = make_teacher(teacher_model, num_classes, guidance["scale"], tuple(guidance["interval"]), conversion)
    seed_initialisation(config)

    def draw_data(generator: torch.Generator, batch: int):
        images = training_data()[0]
        if images is None:
            raise ConfigError(f"this method trains on data, and dataset={LABELS_ONLY} has none: use dataset=latents "
                              f"with data.root=<a `piflow encode-images` folder>")
        return images.batch(torch.randint(len(images), (batch,), generator=generator), generator)

    def draw_cond(generator: torch.Generator, batch: int):
        labels = training_data()[1]
        return labels[torch.randint(len(labels), (batch,), generator=generator)]

    return DistillSetup(
        config=config, teacher=teacher, teacher_model=teacher_model,
        new_backbone=lambda: type(teacher_model)(teacher_model.config),   # a fresh network of the teacher's kind
        policy_student=lambda policy, num_nodes: build_student(config, teacher_model, policy, num_nodes, conversion),
        shape=shape, draw_data=draw_data, draw_cond=draw_cond, num_timesteps=NUM_TIMESTEPS,
        teacher_identity=lambda: teacher_identity(config["teacher"]), teacher_conversion=conversion)


def distill(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Distillation of a DiT teacher by the configured method (π-ID on a GM/DX student by default; x0-regression,
    DMD2, MeanFlow); writes student.safetensors, a sample grid against the teacher and metrics."""
    check_settings(config)
    setup = distill_setup(config)

    def evaluate(sampler) -> dict:
        from piflow.recipes import plots

        gen = torch.Generator().manual_seed(config["eval"]["seed"])
        num_classes = int(setup.teacher_model.config.num_classes)
        noise, y = _eval_inputs(32, setup.shape, num_classes, gen)
        with torch.no_grad():
            rows = [euler_sample(setup.teacher, noise, 32, y), euler_sample(setup.teacher, noise, sampler.nfe, y),
                    sampler.sample(noise, cond=y, temperature=config["eval"]["temperature"], generator=gen)]
        labels_text = ["teacher Euler, 32 NFE", f"teacher Euler, {sampler.nfe} NFE",
                       f"{student_label(config)} student, {sampler.nfe} NFE"]
        decode = latent_decoder(config)
        plots.plot_image_rows([(text, decode(r[:16])) for text, r in zip(labels_text, rows)], run_dir / "samples.png",
                              title="same noise and class in each column (classes 0, 1, 2, …)")
        return {"coupling_rmse_vs_teacher32": float((rows[2] - rows[0]).square().mean().sqrt())}

    return distill_run(run_dir, allow_config_change, setup, evaluate)


def student_label(config: dict) -> str:
    """GM / DX (π-ID), x0-regression, DMD2 or MeanFlow: the student of a run config, for figure labels."""
    from piflow.methods import METHODS, method_name

    name = method_name(config)
    return {"gmflow": "GM", "dx": "DX"}[config["student"]["policy"]] if name == "piid" else METHODS[name].title


def load_student(run_dir: Path, overrides=()) -> tuple[Any, dict]:
    """(sampler, config) of a finished image distillation run of any method (`PiFlow` for π-ID and x0)."""
    config, weights = finished_distill_run(run_dir, IMAGE_DISTILL_DEFAULTS, overrides)
    return load_distilled(distill_setup(config, load_data=False), weights), config


def sample_spec(config: dict) -> tuple[tuple[int, ...], int]:
    """(one sample's shape (C, H, W), number of classes) of an image run, from its teacher's DiT config (a
    checkpoint-file teacher is converted to read it)."""
    run = Path(teacher_source(config["teacher"]))
    if not run.exists():
        raise missing_teacher_run(run, "teacher/")
    if run.is_file():
        spec = load_teacher(str(run), config["teacher_layout"], config["teacher_input_size"])[0].config
    else:
        try:
            spec = read_image_network_config(run / "teacher" if (run / "teacher").is_dir() else run)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"teacher: {error}") from None
    return (spec.in_channels, *spec.input_size), int(spec.num_classes)


def latent_decoder(config: dict, device=None):
    """Samples → images in [−1, 1]: the identity for pixel-space runs, the ``vae``'s decoder for latent ones (loaded
    once per call of this function)."""
    if config.get("vae") is None:
        return lambda samples: samples
    from piflow.integrations.diffusers.vae import LatentCodec, load_vae

    return LatentCodec(load_vae(config["vae"], device or "cpu", option="vae")).decode


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, label: str = "") -> None:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid under `label` (C = 1 or 3; otherwise channel 0)."""
    from piflow.recipes.plots import plot_image_rows

    plot_image_rows([(label, images)], path, ncol=nrow)
