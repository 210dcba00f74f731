"""π-ID distillation of a diffusers pipeline of any family (FLUX.1/FLUX.2, Qwen-Image(-Edit), SD3, Z-Image, Wan; see
`piflow.integrations.diffusers.families`) into a LoRA policy student (algorithm.md §4.4–4.7, §6.3–6.6):
``piflow distill pipeline=PATH_OR_REPO prompts=prompts.txt`` (editing: ``conditions=conditions.jsonl``; video:
``num_frames=81``).

* Teacher = the base transformer with the student's LoRA disabled (one copy of the base weights for teacher,
  student and EMA); FLUX.1/FLUX.2 [dev] get the distilled-guidance scalar, the others true CFG against the negative
  prompt (Qwen-Image-Edit's encoded with each condition's reference images), both within ``guidance.interval``.
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

from pathlib import Path
from typing import Any, Optional

import torch

from piflow.config import ConfigError, Optional_
from piflow.files import one_line
from piflow.errors import require
from piflow.integrations.diffusers.families.base import TEXT_TO_IMAGE_SCHEDULE
from piflow.integrations.diffusers.loading import (DTYPES, base_dtype, default_device,  # noqa: F401
                                                   from_pretrained, latent_geometry, load_base, pipeline_family)
from piflow.model import PiFlow
from piflow.methods.piid import as_run, piid_loss_fn, piid_settings
from piflow.recipes.common import check_settings, distill_defaults, run_recipe, seed_initialisation, train_defaults
from piflow.settings import TEXT_TO_IMAGE_POLICY_DROPOUT


T2I_DISTILL_DEFAULTS: dict[str, Any] = {
    "pipeline": Optional_(str),   # local folder or hub id of the base diffusers pipeline
    "architecture": "auto",       # model family: flux | sd3 | qwen | … (auto: from the pipeline's model_index.json)
    "method": "piid",             # text-to-image students are π-ID students (LoRA + policy head)
    "dtype": "auto",              # base weights: bf16 on CUDA, fp32 on CPU ("bf16", "fp16", "fp32")
    "quantize": Optional_(str),   # frozen base quantized (QLoRA-style): torchao-int8 | bnb-nf4 | bnb-int8 (CUDA)
    "prompts": Optional_(str),    # prompt file, one per line
    "conditions": Optional_(str),     # editing: JSON Lines {"prompt": ..., "images": [...]} per condition
    "prompt_cache": Optional_(str),   # folder from `piflow encode-prompts` (then text encoders are not loaded)
    "latents": Optional_(str),    # data-dependent π-ID: latents (N, C, h, w) aligned with the prompts
    "resolution": [1024, 1024],   # training image size in pixels (height, width)
    "num_frames": 1,              # video families: frames per clip (Wan: 4k + 1)
    "max_sequence_length": 512,
    "parallel": "ddp",            # under torchrun: "ddp" (replicated base) or "fsdp" (FSDP2-sharded frozen base)
    "student": {"policy": "gmflow", "num_components": 8, "num_nodes": 10, "dx_mode": "grid",
                "logstd_hidden": 1024, "head_noise_std": 0.05, "lora_rank": 256, "lora_alpha": 256.0,
                "lora_dropout": 0.05, "gradient_checkpointing": False},
    "guidance": {"scale": Optional_(float), "interval": [0.0, 1.0], "negative_prompt": ""},  # null: FLUX 3.5, else 4
    # §4.7 text-to-image settings; policy_dropout null: 0.1 for GMFlow (the authors' configs), 0 for DX
    "distill": distill_defaults(data_free=True, **TEXT_TO_IMAGE_SCHEDULE, num_intermediate_states=4,
                                window_substeps=3, loss_scale=30.0, num_decay_iters=2000, batch_size=2),
    "train": train_defaults(iters=3000, lr=1e-4, checkpoint_every=200, log_every=10),
    "eval": {"prompts": ["a photo of a cat", "a watercolor painting of a lighthouse at dusk"], "nfe": [4],
             "seed": 0, "temperature": "auto"},
}

def is_text_to_image(config_or_overrides: dict) -> bool:
    return config_or_overrides.get("pipeline") is not None


def read_conditions(config: dict) -> tuple[str, Any]:
    """(family, conditions) of a run, read and checked before anything heavy is loaded: the prompt cache (its
    index and shard headers, encoded for this family), or the prompts (and reference images) of the prompt or
    conditions file — an empty, binary or mixed-size input is a one-line error, no run directory made."""
    from piflow.integrations.diffusers.prompts import PromptEmbeddingCache, read_condition_source

    family = run_family(config)
    if config["prompt_cache"] is not None:
        return family, PromptEmbeddingCache(config["prompt_cache"], family)
    return family, read_condition_source(family, config["prompts"], config["conditions"],
                                         alternative=" or prompt_cache=<folder from `piflow encode-prompts`>")


def prompt_source(config: dict, pipe, architecture: str, conditions):
    """The run's conditions as the training draws them: a prompt cache as it is, or (prompts, images) of
    `read_conditions` encoded now with the pipeline's text encoders."""
    from piflow.integrations.diffusers.prompts import EncodedPrompts

    if not isinstance(conditions, tuple):
        return conditions
    prompts, images = conditions
    return EncodedPrompts(pipe, architecture, prompts, config["guidance"]["negative_prompt"],
                          config["max_sequence_length"], images=images)


def guidance_scale(config: dict, family: str) -> float:
    """``guidance.scale``, or the family's default — 1 (no CFG) for a step-distilled checkpoint whose pipeline
    config says ``is_distilled`` (FLUX.2 [klein]), as its stock pipeline does."""
    from piflow.integrations.diffusers.families import get_family
    from piflow.integrations.diffusers.loading import _model_index

    scale = config["guidance"]["scale"]
    if scale is not None:
        return float(scale)
    spec = get_family(family)
    if spec.guidance == "cfg" and config.get("pipeline") and _model_index(config["pipeline"]).get("is_distilled"):
        return 1.0
    return spec.guidance_scale


def make_text_teacher(transformer, family: str, config: dict, null_cond: dict):
    """The family's teacher: FLUX.1 the base with the distilled-guidance input, true-CFG families classifier-free
    guidance against `null_cond`, guidance-free (distilled) bases as they are."""
    from piflow.integrations.diffusers.families import get_family
    from piflow.integrations.diffusers.students import DiffusersTeacher
    from piflow.teachers import ClassifierFreeGuidance

    spec = get_family(family)
    base = DiffusersTeacher(transformer, spec.architecture, scheduler_config=diffusion_schedule(config, family))
    if spec.guidance != "cfg":
        return base
    return ClassifierFreeGuidance(base, guidance_scale(config, family), null_cond,
                                  tuple(config["guidance"]["interval"]), batched=False)


def diffusion_schedule(config: dict, family: str) -> Optional[dict]:
    """The pipeline's scheduler config for a diffusion family (None for flow families), checked: a prediction type
    or schedule piflow cannot convert is a one-line ConfigError."""
    from piflow.integrations.diffusers.families import get_architecture, get_family
    from piflow.integrations.diffusers.loading import scheduler_config

    scheduler = scheduler_config(config["pipeline"], family)
    if scheduler is None:
        return None
    parametrisation = get_architecture(get_family(family).architecture).parametrisation
    try:
        parametrisation.schedule(scheduler)
    except ValueError as error:
        raise ConfigError(f"pipeline {config['pipeline']}: {one_line(error, 300)}") from None
    return scheduler


def t2i_settings(config: dict):
    """The run's `PiIDSettings` (policy_dropout null: the text-to-image default of the policy)."""
    dropout = config["distill"]["policy_dropout"]
    kind = config["student"]["policy"]
    if kind not in ("gmflow", "dx"):
        raise ConfigError(f"student.policy must be 'gmflow' or 'dx' for text-to-image, got {kind!r}")
    default = {} if dropout is not None else {"policy_dropout": TEXT_TO_IMAGE_POLICY_DROPOUT.get(kind, 0.0)}
    return piid_settings(config, **default)


def build_lora_student(config: dict, transformer, family: str, latent_channels: int):
    from piflow.integrations.diffusers.families import get_family
    from piflow.integrations.diffusers.students import ARCHITECTURES, DiffusersPolicyStudent, add_student_lora

    architecture = get_family(family).architecture
    s = config["student"]
    if s["policy"] not in ("gmflow", "dx"):
        raise ConfigError(f"student.policy must be 'gmflow' or 'dx' for text-to-image, got {s['policy']!r}")
    add_student_lora(transformer, rank=int(s["lora_rank"]), alpha=float(s["lora_alpha"]),
                     dropout=float(s["lora_dropout"]),
                     target_modules=ARCHITECTURES[architecture].lora_targets(transformer))
    if s["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    student = DiffusersPolicyStudent(
        transformer, s["policy"], num_components=int(s["num_components"]), num_nodes=int(s["num_nodes"]),
        dx_mode=s["dx_mode"], latent_channels=latent_channels, head_noise_std=float(s["head_noise_std"]),
        logstd_hidden=int(s["logstd_hidden"]), share_transformer=True, architecture=architecture,
        generator=torch.Generator().manual_seed(int(config["train"]["seed"])), settings=t2i_settings(config),
        policy_kwargs={"mode": s["dx_mode"]} if s["policy"] == "dx" else None,
        scheduler_config=diffusion_schedule(config, family))
    # trainable modules in float32 (§4.6); the frozen base keeps its dtype
    for module in (student.head, student.norm_out):
        module.float()
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return student


def run_family(config: dict, transformer=None) -> str:
    """The run's model family: from the base pipeline's model_index.json, checked against config
    ``architecture`` (when not "auto") and the transformer's class."""
    from piflow.integrations.diffusers.families import FAMILIES

    family = pipeline_family(config["pipeline"])
    if config["architecture"] != "auto":
        chosen, same = FAMILIES.get(config["architecture"]), family.transformer_class
        if chosen is None or chosen.transformer_class != same:
            raise ConfigError(f"architecture={config['architecture']!r} does not match the pipeline "
                              f"({family.stock_pipeline} with a {family.transformer_class}); expected 'auto' or "
                              f"one of {sorted(n for n, f in FAMILIES.items() if f.transformer_class == same)}")
        family = chosen
    if transformer is not None and type(transformer).__name__ != family.transformer_class:
        raise ConfigError(f"the pipeline's transformer is a {type(transformer).__name__}, expected a "
                          f"{family.transformer_class} for {family.name}")
    return family.name


def lora_student(config: dict, transformer):
    """(a new LoRA student of `transformer` for a T2I config, family, latent (C, [T,] h, w)); the student carries
    the run's `PiIDSettings`, so that pipelines and adapters sample on its schedule."""
    family = run_family(config, transformer)
    geometry = latent_geometry(config["pipeline"], family, transformer, config["resolution"],
                               int(config.get("num_frames") or 1))
    seed_initialisation(config)                         # LoRA A and head initialisation: reproducible runs
    return build_lora_student(config, transformer, family, geometry[0]), family, geometry


def _text_condition(items, family: str, config: dict, device, dtype) -> dict:
    from piflow.integrations.diffusers.families import get_family
    from piflow.integrations.diffusers.prompts import collate_text

    cond = collate_text(items, family, device, dtype)
    if get_family(family).guidance == "embedded":
        cond["guidance"] = torch.full((len(items),), guidance_scale(config, family), device=device)
    return cond


def _eval_conditions(source, config: dict) -> Optional[tuple]:
    """(prompts, reference image paths) of the first conditions of an editing run (its sample grid), else None."""
    images = getattr(source, "images", None)
    if not images:
        return None
    count = max(1, len(config["eval"]["prompts"]))
    return list(source.prompts[:count]), [list(refs) for refs in images[:count]]


def _load_latents(path: str, count: int, shape: tuple[int, ...]) -> torch.Tensor:
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
        raise ConfigError("pipeline=<local folder or hub id of a diffusers pipeline of a supported family> is required")
    require("diffusers", "text-to-image distillation")
    require("peft", "text-to-image distillation")
    if config["parallel"] not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel must be 'ddp' or 'fsdp', got {config['parallel']!r}")
    if config["method"] != "piid":
        raise ConfigError(f"method={config['method']} is not available for text-to-image (diffusers) students: "
                          f"they are π-ID students (method=piid); the other methods train 2-D and image runs")
    from piflow.train import distributed

    device = default_device()
    dtype = base_dtype(config, device)
    train_section = dict(config["train"])
    if train_section["mixed_precision"] == "no" and dtype in (torch.bfloat16, torch.float16):
        train_section["mixed_precision"] = "bf16" if dtype == torch.bfloat16 else "fp16"
    check_settings(config)
    config = as_run(config, t2i_settings(config))       # a bad distill value fails before anything is loaded
    _, conditions = read_conditions(config)             # so does a bad prompt file, conditions file or cache
    pipe, transformer = load_base(config, device, dtype)
    student, architecture, geometry = lora_student(config, transformer)       # geometry: (C, [T,] h, w)
    student = student.to(device)
    prompts = prompt_source(config, pipe, architecture, conditions)
    null_item = prompts.null()      # None: each condition carries its own negative (cond["null"])
    null = (lambda cond: cond["null"]) if null_item is None else _text_condition([null_item], architecture, config,
                                                                                  device, dtype)
    pf = PiFlow(student, make_text_teacher(transformer, architecture, config, null), student.settings,
                policy_kwargs=student.policy_kwargs)
    sharded = config["parallel"] == "fsdp" and distributed.current().enabled
    if sharded:
        from piflow.train.fsdp import shard_frozen_base

        shard_frozen_base(transformer)
    latents = None if config["latents"] is None else _load_latents(config["latents"], len(prompts), geometry)
    batch = int(config["distill"]["batch_size"])
    data_free = bool(config["distill"]["data_free"]) and latents is None
    is_main = distributed.current().is_main

    def draw(generator: torch.Generator):
        index = torch.randint(len(prompts), (batch,), generator=generator)
        cond = _text_condition([prompts[int(i)] for i in index], architecture, config, device, dtype)
        return (None if latents is None else latents[index].to(device)), cond

    def finish(result) -> dict:
        metrics: dict[str, Any] = {"final_loss": result.history[-1]["loss"], "architecture": architecture,
                                   "iters": len(result.history),
                                   "trainable_parameters": sum(p.numel() for p in student.parameters()
                                                               if p.requires_grad)}
        from piflow.integrations.diffusers.adapter import save_piflow_adapter

        with result.ema.averaged(student) as ema_student:   # carries the student's settings
            if is_main:
                save_piflow_adapter(ema_student, run_dir / "adapter")
            if pipe is not None and config["eval"]["prompts"] and (is_main or sharded):   # FSDP: all ranks gather
                from piflow.recipes.text_to_image_outputs import save_sample_grid

                path = save_sample_grid(pipe, ema_student, config, run_dir / "samples.png", write=is_main,
                                        family=architecture, conditions=_eval_conditions(prompts, config))
                metrics["samples"] = str(path)
        return metrics

    return run_recipe(config, run_dir, "distill", allow_config_change, student,
                      piid_loss_fn(pf, draw, batch, data_free, tuple(geometry), device), finish,
                      "π-ID loss", train_section=train_section, is_main=is_main)
