"""Text-to-image π-ID distillation of a diffusers FLUX / SD3 / Qwen-Image pipeline into a LoRA policy student
(algorithm.md §4.4–4.7, §6.3–6.6): ``piflow distill pipeline=PATH_OR_REPO prompts=prompts.txt``.

* Teacher = the base transformer with the student's LoRA disabled (one copy of the base weights for teacher,
  student and EMA); FLUX gets the distilled-guidance scalar, SD3/Qwen true CFG against the negative prompt, both
  within ``guidance.interval`` (σ units).
* Data-free π-ID (§4.4) by default; data-dependent when ``latents`` (a .safetensors/.npy of VAE latents, already
  scaled as the pipeline's transformer sees them, aligned with the prompt file) is given.
* Prompts from a prompt file (encoded on the fly by the pipeline's text encoders, kept in memory) or a cache from
  ``piflow encode-prompts`` (then only the transformer is loaded).
* Run directory: ``config.yaml``, ``checkpoint.safetensors`` (trainable tensors + EMA + optimizer; resumed
  automatically),
  ``train_log.jsonl``, TensorBoard scalars, ``loss.png``, ``adapter/`` (EMA student, piflow adapter format),
  ``samples.png`` (when the VAE is loaded) and ``metrics.json``. Under torchrun, data-parallel over ranks.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from piflow.config import ConfigError
from piflow.errors import require
from piflow.files import one_line
from piflow.recipes.common import (TRAIN_DEFAULTS, build_pipeline, check_settings, seed_initialisation, start_run,
                                   train_config, write_json)

T2I_DISTILL_DEFAULTS: dict[str, Any] = {
    "pipeline": None,             # local folder or hub id of the base diffusers pipeline
    "architecture": "auto",       # flux | sd3 | qwen (auto: from the transformer class)
    "dtype": "auto",              # base weights: bf16 on CUDA, fp32 on CPU ("bf16", "fp16", "fp32")
    "prompts": None,              # prompt file, one per line
    "prompt_cache": None,         # folder from `piflow encode-prompts` (then text encoders are not loaded)
    "latents": None,              # data-dependent π-ID: latents (N, C, h, w) aligned with the prompts
    "resolution": [1024, 1024],   # training image size in pixels (height, width)
    "max_sequence_length": 512,
    "parallel": "ddp",            # under torchrun: "ddp" (replicated base) or "fsdp" (FSDP2-sharded frozen base)
    "student": {"policy": "gmflow", "num_components": 8, "num_nodes": 10, "dx_mode": "grid",
                "logstd_hidden": 1024, "head_noise_std": 0.05, "lora_rank": 256, "lora_alpha": 256.0,
                "lora_dropout": 0.05, "gradient_checkpointing": False},
    "guidance": {"scale": None, "interval": [0.0, 1.0], "negative_prompt": ""},   # None: FLUX 3.5, others 4.0
    "distill": {"nfe": 4, "data_free": True, "final_step_size_scale": 0.5, "shift": 3.2,
                "num_intermediate_states": 4, "window_substeps": 3, "gm_dropout": 0.1, "loss_scale": 30.0,
                "num_decay_iters": 2000, "total_substeps": 128, "batch_size": 2},
    "train": dict(TRAIN_DEFAULTS, iters=3000, lr=1e-4, warmup_iters=100, grad_clip_from=100, ema_start=100,
                  checkpoint_every=200, log_every=10),
    "eval": {"prompts": ["a photo of a cat", "a watercolor painting of a lighthouse at dusk"], "nfe": [4],
             "seed": 0, "temperature": "auto"},
}

TRANSFORMER_ARCHITECTURES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                             "QwenImageTransformer2DModel": "qwen"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_text_to_image(config_or_overrides: dict) -> bool:
    return config_or_overrides.get("pipeline") is not None


def _device() -> torch.device:
    from piflow.train import distributed

    if torch.cuda.is_available():
        return torch.device("cuda", distributed.current().local_rank)
    return torch.device("cpu")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


SAFE_LIBRARIES = ("diffusers", "transformers")


def _model_index(path: str) -> dict:
    """A pipeline's model_index.json, checked so that loading it cannot import code from the pipeline folder: every
    component must come from diffusers or transformers (diffusers would otherwise import a module that ships with
    the pipeline)."""
    DiffusionPipeline = require("diffusers", "text-to-image pipelines").DiffusionPipeline
    try:
        index = DiffusionPipeline.load_config(path)
    except Exception as error:      # not a folder/repo with model_index.json, bad JSON, offline hub
        raise ConfigError(f"pipeline={path!r} is not a diffusers pipeline folder or reachable Hub repo "
                          f"({type(error).__name__}: {one_line(error, 200)})") from None
    for name, value in index.items():
        if not (isinstance(value, (list, tuple)) and len(value) == 2) or value[0] is None:
            continue
        if value[0] not in SAFE_LIBRARIES:
            raise ConfigError(f"pipeline {path}: component {name!r} comes from {value[0]!r}; piflow loads only "
                              f"components of {list(SAFE_LIBRARIES)} (custom code in a pipeline folder would run)")
        if str(value[1]).endswith("Pipeline") or (Path(path) / str(name) / "model_index.json").is_file():
            raise ConfigError(f"pipeline {path}: component {name!r} is itself a pipeline; piflow does not load "
                              f"nested pipelines (their weights would escape these checks)")
    return index


def pipeline_architecture(path: str) -> str:
    """"flux", "sd3" or "qwen" from a diffusers pipeline's model_index.json (nothing is loaded)."""
    transformer_class = _model_index(path)["transformer"][1]
    if transformer_class not in TRANSFORMER_ARCHITECTURES:
        raise ConfigError(f"{path}: transformer class {transformer_class} is not supported; expected one of "
                          f"{sorted(TRANSFORMER_ARCHITECTURES)} (see the bring-your-own-teacher guide)")
    return TRANSFORMER_ARCHITECTURES[transformer_class]


def architecture_of(transformer: torch.nn.Module) -> str:
    name = type(transformer).__name__
    if name not in TRANSFORMER_ARCHITECTURES:
        raise ConfigError(f"transformer class {name} is not supported; expected one of "
                          f"{sorted(TRANSFORMER_ARCHITECTURES)} (see the bring-your-own-teacher guide)")
    return TRANSFORMER_ARCHITECTURES[name]


def latent_geometry(path: str, architecture: str, transformer, resolution) -> tuple[int, int, int]:
    """(channels, height, width) of the latents the transformer sees for a `resolution` image."""
    import diffusers

    vae_class = _model_index(path).get("vae", [None, "AutoencoderKL"])[1]
    vae_config = getattr(diffusers, vae_class).load_config(path, subfolder="vae")
    if architecture == "qwen":
        factor = 2 ** len(vae_config["temperal_downsample"])
    else:
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    height, width = (int(v) for v in resolution)
    multiple = factor * (1 if architecture == "sd3" else 2)
    if height % multiple or width % multiple:
        raise ConfigError(f"resolution {height}×{width} must be divisible by {multiple} for this pipeline")
    channels = transformer.config.in_channels // (1 if architecture == "sd3" else 4)
    return channels, height // factor, width // factor


def _from_pretrained(cls, path: str, **kwargs):
    """``cls.from_pretrained(path, use_safetensors=True, ...)``: weights are read from safetensors only (never from
    pickled ``.bin`` files); a pipeline without them is a one-line `ConfigError`."""
    _model_index(path)
    try:
        return cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load {cls.__name__} from {path} with safetensors weights (piflow never loads "
                          f"pickled .bin weights): {one_line(error, 300)}") from None


def load_base(config: dict, device: torch.device, dtype: torch.dtype, transformer_only: bool = False):
    """(pipeline or None, frozen transformer): only the transformer when prompts come from a cache (or
    `transformer_only`), else the whole pipeline, whose text encoders encode the prompts here."""
    import diffusers

    path = config["pipeline"]
    if transformer_only or config["prompt_cache"] is not None:
        transformer_class = _model_index(path)["transformer"][1]
        transformer = _from_pretrained(getattr(diffusers, transformer_class), path, subfolder="transformer",
                                       torch_dtype=dtype)
        return None, transformer.to(device).requires_grad_(False)
    pipe = _from_pretrained(diffusers.DiffusionPipeline, path, torch_dtype=dtype)
    pipe.to(device)
    return pipe, pipe.transformer.requires_grad_(False)


def prompt_source(config: dict, pipe, architecture: str):
    from piflow.integrations.diffusers.prompts import EncodedPrompts, PromptEmbeddingCache, read_prompt_file

    if config["prompt_cache"] is not None:
        return PromptEmbeddingCache(config["prompt_cache"], architecture)
    if config["prompts"] is None:
        raise ConfigError("give prompts=<prompt file> or prompt_cache=<folder from `piflow encode-prompts`>")
    return EncodedPrompts(pipe, architecture, read_prompt_file(config["prompts"]),
                          config["guidance"]["negative_prompt"], config["max_sequence_length"])


def guidance_scale(config: dict, architecture: str) -> float:
    scale = config["guidance"]["scale"]
    return (3.5 if architecture == "flux" else 4.0) if scale is None else float(scale)


def make_text_teacher(transformer, architecture: str, config: dict, null_cond: dict):
    """FLUX: the base with the distilled-guidance input; SD3/Qwen: true CFG against `null_cond`."""
    from piflow.integrations.diffusers.students import DiffusersTeacher
    from piflow.teachers import ClassifierFreeGuidance

    base = DiffusersTeacher(transformer, architecture)
    scale = guidance_scale(config, architecture)
    if architecture == "flux":
        return base
    return ClassifierFreeGuidance(base, scale, null_cond, tuple(config["guidance"]["interval"]), batched=False)


def build_lora_student(config: dict, transformer, architecture: str, latent_channels: int):
    from piflow.integrations.diffusers.students import ARCHITECTURES, DiffusersPolicyStudent, add_student_lora

    s = config["student"]
    if s["policy"] not in ("gmflow", "dx"):
        raise ConfigError(f"student.policy must be 'gmflow' or 'dx' for text-to-image, got {s['policy']!r}")
    add_student_lora(transformer, rank=int(s["lora_rank"]), alpha=float(s["lora_alpha"]),
                     dropout=float(s["lora_dropout"]),
                     target_modules=ARCHITECTURES[architecture].lora_targets(transformer))
    if s["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    d = config["distill"]
    student = DiffusersPolicyStudent(
        transformer, s["policy"], num_components=int(s["num_components"]), num_nodes=int(s["num_nodes"]),
        dx_mode=s["dx_mode"], latent_channels=latent_channels, head_noise_std=float(s["head_noise_std"]),
        logstd_hidden=int(s["logstd_hidden"]), share_transformer=True, architecture=architecture,
        generator=torch.Generator().manual_seed(int(config["train"]["seed"])),
        sampling={"nfe": d["nfe"], "shift": d["shift"], "final_step_size_scale": d["final_step_size_scale"]})
    # trainable modules in float32 (§4.6); the frozen base keeps its dtype
    for module in (student.head, student.norm_out):
        module.float()
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return student


def lora_student_pipeline(config: dict, transformer, teacher):
    """(PiFlow around a new LoRA student of `transformer`, architecture, latent (C, h, w)) for a T2I config; the
    student's policy settings are the pipeline's, so adapters keep them."""
    architecture = architecture_of(transformer)
    if config["architecture"] not in ("auto", architecture):
        raise ConfigError(f"architecture={config['architecture']!r} does not match the transformer "
                          f"({type(transformer).__name__})")
    geometry = latent_geometry(config["pipeline"], architecture, transformer, config["resolution"])
    seed_initialisation(config)                         # LoRA A and head initialisation: reproducible runs
    student = build_lora_student(config, transformer, architecture, geometry[0])
    pf = build_pipeline(config, student, teacher)
    student.policy_kwargs = dict(pf.policy_kwargs)
    return pf, architecture, geometry


def _text_condition(items, architecture: str, config: dict, device, dtype) -> dict:
    from piflow.integrations.diffusers.prompts import collate_text

    cond = collate_text(items, architecture, device, dtype)
    if architecture == "flux":
        cond["guidance"] = torch.full((len(items),), guidance_scale(config, architecture), device=device)
    return cond


def _load_latents(path: str, count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    from piflow.data.images import LatentDataset

    latents, _ = LatentDataset(path).tensors()
    if tuple(latents.shape[1:]) != tuple(shape):
        raise ConfigError(f"latents have shape {tuple(latents.shape[1:])} per item, but the configured `resolution` "
                          f"needs latents of shape {tuple(shape)}")
    if latents.shape[0] != count:
        raise ConfigError(f"latents hold {latents.shape[0]} items but there are {count} prompts; they must be "
                          "aligned (latent i is the image of prompt i)")
    return latents


def distill_text_to_image(config: dict, run_dir: Path, allow_config_change: bool = False) -> dict:
    """Run (or resume) a text-to-image π-ID distillation; returns metrics (also written to metrics.json).
    Everything (base pipeline, prompts, latents, settings) is loaded and checked before the run directory is
    touched."""
    if not is_text_to_image(config):
        raise ConfigError("pipeline=<local folder or hub id of a FLUX/SD3/Qwen-Image diffusers pipeline> is required")
    require("diffusers", "text-to-image distillation")
    require("peft", "text-to-image distillation")
    if config["parallel"] not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel must be 'ddp' or 'fsdp', got {config['parallel']!r}")
    from piflow.train import distributed
    from piflow.train.loop import train

    device = _device()
    dtype = _dtype(config["dtype"], device)
    train_section = dict(config["train"])
    if train_section["mixed_precision"] == "no" and dtype in (torch.bfloat16, torch.float16):
        train_section["mixed_precision"] = "bf16" if dtype == torch.bfloat16 else "fp16"
    check_settings(config)
    settings = train_config({"train": train_section})
    pipe, transformer = load_base(config, device, dtype)
    pf, architecture, (channels, latent_h, latent_w) = lora_student_pipeline(config, transformer, teacher=None)
    student = pf.student.to(device)
    prompts = prompt_source(config, pipe, architecture)
    null = _text_condition([prompts.null()], architecture, config, device, dtype)
    pf.teacher = make_text_teacher(transformer, architecture, config, null)
    sharded = config["parallel"] == "fsdp" and distributed.current().enabled
    if sharded:
        from piflow.train.fsdp import shard_frozen_base

        shard_frozen_base(transformer)
    latents = None if config["latents"] is None else _load_latents(config["latents"], len(prompts),
                                                                    (channels, latent_h, latent_w))
    batch = int(config["distill"]["batch_size"])
    accum = int(config["train"]["grad_accum_steps"])
    data_free = bool(config["distill"]["data_free"]) and latents is None

    with start_run(run_dir, config, "distill", allow_config_change) as run:
        def loss_fn(iteration: int, generator: torch.Generator):
            index = torch.randint(len(prompts), (batch,), generator=generator)
            cond = _text_condition([prompts[int(i)] for i in index], architecture, config, device, dtype)
            if data_free:
                noise = torch.randn(batch, channels, latent_h, latent_w, generator=generator).to(device)
                loss = pf.data_free_loss(noise, cond, iteration=iteration, generator=generator,
                                         backward=lambda value: (value / accum).backward())
                return loss, True
            return pf(latents[index].to(device), cond, iteration=iteration, generator=generator)

        start = time.perf_counter()
        result = train(student, loss_fn, settings, run_dir, desc="distill", on_start=run.commit)
        seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {"train_seconds": seconds, "final_loss": result.history[-1]["loss"],
                                   "architecture": architecture, "iters": len(result.history),
                                   "trainable_parameters": sum(p.numel() for p in student.parameters()
                                                               if p.requires_grad)}
        from piflow.integrations.diffusers.adapter import save_piflow_adapter

        is_main = distributed.current().is_main
        with result.ema.averaged(student) as ema_student:   # carries the student's policy_kwargs and sampling
            if is_main:
                save_piflow_adapter(ema_student, run_dir / "adapter")
            if pipe is not None and config["eval"]["prompts"] and (is_main or sharded):   # FSDP: all ranks gather
                path = save_sample_grid(pipe, ema_student, config, run_dir / "samples.png", write=is_main)
                metrics["samples"] = str(path)
        if is_main:
            from piflow.recipes import plots

            plots.plot_loss_curve(result.history, run_dir / "loss.png", "π-ID loss")
            write_json(run_dir / "metrics.json", metrics)
        return metrics


@torch.no_grad()
def save_sample_grid(pipe, student, config: dict, path: Path, write: bool = True) -> Path:
    """One row per eval NFE, one column per eval prompt, from the π-Flow pipeline of `pipe`'s class."""
    import numpy as np

    from piflow.integrations.diffusers.pipelines import PIPELINES
    from piflow.recipes.plots import _pyplot

    architecture = student.architecture.name
    pi_pipe = PIPELINES[architecture](**pipe.components)
    pi_pipe.set_progress_bar_config(disable=True)
    pi_pipe.set_piflow_student(student)
    height, width = (int(v) for v in config["resolution"])
    rows = []
    for nfe in config["eval"]["nfe"]:
        images = pi_pipe(list(config["eval"]["prompts"]), height=height, width=width, num_inference_steps=int(nfe),
                         temperature=config["eval"]["temperature"], output_type="np",
                         generator=torch.Generator().manual_seed(int(config["eval"]["seed"]))).images
        rows.append(np.concatenate(list(images), axis=1))
    if not write:
        return path
    plt = _pyplot()
    grid = np.concatenate(rows, axis=0)
    fig = plt.figure(figsize=(2 * grid.shape[1] / height, 2 * grid.shape[0] / height))
    plt.imshow(np.clip(grid, 0, 1))
    plt.axis("off")
    plt.title(f"NFE {list(config['eval']['nfe'])} (rows) × prompts (columns)", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _is_piflow_adapter(directory: Path) -> bool:
    from piflow.files import read_json

    try:
        config = read_json(directory / "config.json", "adapter config")
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(config, dict) and "policy_config" in config and "architecture" in config


def export_adapter(run_dir: Path, output: Optional[Path] = None, use_ema: bool = True) -> Path:
    """Turn a (possibly unfinished) run's checkpoint into an adapter folder (EMA weights by default)."""
    from piflow.config import load_config
    from piflow.integrations.diffusers.adapter import save_piflow_adapter
    from piflow.train.checkpoint import CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME, CheckpointError, load_checkpoint
    from piflow.train.ema import frozen_parameter_names, load_partial_state

    run_dir = Path(run_dir)
    config_path, checkpoint_path = run_dir / "config.yaml", run_dir / CHECKPOINT_NAME
    has_checkpoint = checkpoint_path.is_file() or (run_dir / LEGACY_CHECKPOINT_NAME).is_file()
    if not config_path.is_file() or not has_checkpoint:
        raise ConfigError(f"{run_dir} is not a text-to-image distillation run with a checkpoint "
                          f"(needs config.yaml and {CHECKPOINT_NAME})")
    output = Path(output) if output is not None else run_dir / "adapter"
    if output.resolve() == run_dir.resolve() or (output / "config.yaml").exists() or output.is_file() or (
            output.is_dir() and any(output.iterdir()) and not (output / "export.json").is_file()
            and not _is_piflow_adapter(output)):
        raise ConfigError(f"--out {output} must be a new or empty folder or a previous piflow adapter, not a run "
                          f"directory, a file or another folder with contents (default: {run_dir / 'adapter'})")
    config = load_config(T2I_DISTILL_DEFAULTS, config_path)
    state = load_checkpoint(checkpoint_path)
    device = torch.device("cpu")
    dtype = _dtype(config["dtype"], device)
    _, transformer = load_base(config, device, dtype, transformer_only=True)
    student = lora_student_pipeline(config, transformer, teacher=None)[0].student
    weights = state["ema"]["model"] if use_ema else state["model"]
    try:
        load_partial_state(student, weights, frozen_parameter_names(student))
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not match the run's config: {error}") from None
    save_piflow_adapter(student, output)
    write_json(output / "export.json", {"run_dir": str(run_dir), "step": int(state["step"]),
                                        "weights": "ema" if use_ema else "raw"})
    return output


@torch.no_grad()
def sample_run(run_dir: Path, prompts: list[str], output: Path, nfe: Optional[int] = None, num_images: int = 1,
               generator: Optional[torch.Generator] = None, temperature: Any = "auto", overrides=()) -> list[Path]:
    """Generate PNGs for `prompts` with a finished run's adapter in the π-Flow pipeline of its base model."""
    from piflow.config import load_config
    from piflow.files import read_json
    from piflow.integrations.diffusers.pipelines import PIPELINES

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "config.json").is_file():
        raise ConfigError(f"{run_dir} has no adapter yet (finish the run or `piflow export --run-dir {run_dir}`)")
    config = load_config(T2I_DISTILL_DEFAULTS, run_dir / "config.yaml", overrides)
    adapter_config = read_json(adapter / "config.json", "adapter config")
    architecture = adapter_config.get("architecture") if isinstance(adapter_config, dict) else None
    if architecture not in PIPELINES:
        raise ConfigError(f"adapter config {adapter / 'config.json'} must name its architecture, one of "
                          f"{sorted(PIPELINES)}; got {architecture!r}")
    device = _device()
    pipe = _from_pretrained(PIPELINES[architecture], config["pipeline"], torch_dtype=_dtype(config["dtype"], device))
    pipe.to(device)
    pipe.load_piflow_adapter(adapter)
    height, width = (int(v) for v in config["resolution"])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    images = pipe(list(prompts), height=height, width=width, num_images_per_prompt=num_images,
                  num_inference_steps=nfe or pipe.piflow_student.sampling.get("nfe", 4), temperature=temperature,
                  generator=generator).images
    paths = []
    for index, image in enumerate(images):
        path = output / f"{index // num_images:03d}_{index % num_images:02d}.png"
        image.save(path)
        paths.append(path)
    write_json(output / "prompts.json", list(prompts))
    return paths
