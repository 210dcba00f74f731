"""Pieces shared by the 2-D, image and text-to-image recipes: training defaults, π-ID pipeline from a config, the
run-directory protocol and atomic writers."""
from __future__ import annotations

from pathlib import Path

import torch

from piflow.config import ConfigError, load_config
from piflow.files import save_safetensors as _save_safetensors
from piflow.files import write_json  # noqa: F401  (re-exported for the recipes)
from piflow.pipeline import PiFlow
from piflow.train import TrainConfig
from piflow.train.run_dir import start_run  # noqa: F401  (re-exported for the recipes)

TRAIN_DEFAULTS = dict(iters=1000, lr=1e-3, betas=[0.9, 0.95], weight_decay=0.0, warmup_iters=100, grad_clip=50.0,
                      grad_clip_from=100, ema_gamma=7.0, ema_start=100, checkpoint_every=None, log_every=50, seed=0,
                      progress=True, grad_accum_steps=1, mixed_precision="no", max_skipped_steps=5)


def train_config(config: dict) -> TrainConfig:
    """The `TrainConfig` of a recipe config's ``train`` section; a bad value is a `ConfigError` naming it (the rest
    of the config is `check_settings`' job, which every recipe calls first)."""
    try:
        return TrainConfig(**config["train"])
    except ValueError as error:
        raise ConfigError(str(error)) from None


# settings no constructor checks before training starts (evaluation runs after it): checked up front by
# `check_settings`, wherever a recipe's config has them
POSITIVE_INTEGERS = ("distill.batch_size", "distill.x0_bank_size", "flow_matching.batch_size", "eval.num_samples",
                     "max_sequence_length", "student.num_components", "student.num_nodes", "student.hidden_size",
                     "student.num_layers", "student.logstd_hidden", "student.lora_rank", "model.hidden_size",
                     "model.num_layers", "model.depth", "model.num_heads", "model.patch_size")
STEP_LISTS = ("eval.teacher_steps", "eval.student_nfe", "eval.nfe")
TEMPERATURES = ("eval.temperature",)


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(config: dict) -> None:
    """A `ConfigError` naming the first bad batch size, sample count, step list or temperature, so that a run never
    trains to the end and then fails in its evaluation."""
    from piflow.sampling import resolve_temperature

    for key in POSITIVE_INTEGERS:
        value = _lookup(config, key)
        if value is not _MISSING and not (_is_int(value) and value >= 1):
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    for key in STEP_LISTS:
        value = _lookup(config, key)
        if value is not _MISSING and not (isinstance(value, list) and all(_is_int(v) and v >= 1 for v in value)):
            raise ConfigError(f"{key} must be a list of integers >= 1, got {value!r}")
    for key in TEMPERATURES:
        value = _lookup(config, key)
        if value is not _MISSING:
            try:
                resolve_temperature(value, 1)
            except (ValueError, TypeError):
                raise ConfigError(f"{key} must be a number >= 0 or 'auto', got {value!r}") from None
    resolution = _lookup(config, "resolution")
    if resolution is not _MISSING and not (isinstance(resolution, list) and len(resolution) == 2
                                           and all(_is_int(v) and v >= 1 for v in resolution)):
        raise ConfigError(f"resolution must be [height, width] in pixels, got {resolution!r}")
    prompts = _lookup(config, "eval.prompts")
    if prompts is not _MISSING and not (isinstance(prompts, list) and all(isinstance(v, str) for v in prompts)):
        raise ConfigError(f"eval.prompts must be a list of strings, got {prompts!r}")
    seed = _lookup(config, "eval.seed")
    if seed is not _MISSING and not (_is_int(seed) and seed >= 0):
        raise ConfigError(f"eval.seed must be an integer >= 0, got {seed!r}")


def check_dataset(name, allowed=None) -> None:
    """A `ConfigError` naming ``dataset`` and every valid name (2-D and image) unless `name` is one of them (or of
    `allowed`, the names a particular recipe takes)."""
    from piflow.data import IMAGE_DATASET_NAMES, TOY_DATASET_NAMES

    names = tuple(allowed) if allowed is not None else TOY_DATASET_NAMES + IMAGE_DATASET_NAMES
    if name not in names:
        raise ConfigError(f"dataset must be one of {list(names)}, got {name!r}")


def seed_initialisation(config: dict) -> None:
    """Seed torch's global generator with ``train.seed`` before a recipe builds its networks, so that weight
    initialisation (nn.Linear defaults, Xavier, LoRA A) and hence whole runs are reproducible."""
    torch.manual_seed(int(config["train"]["seed"]))


def finished_distill_run(run_dir: Path, defaults: dict, overrides=()) -> tuple[dict, Path]:
    """(resolved config, student weights path) of a finished `piflow distill` run, or a RunDirError."""
    from piflow.errors import RunDirError

    config_path, weights = run_dir / "config.yaml", run_dir / "student.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise RunDirError(f"{run_dir} is not a finished distillation run (needs config.yaml and student.safetensors; "
                          f"rerun its `piflow distill` command to finish it)")
    return load_config(defaults, config_path, overrides), weights


def build_pipeline(config: dict, student: torch.nn.Module, teacher) -> PiFlow:
    """`PiFlow` from a config's ``student``/``distill`` sections ("x0" students are one-node DX policies)."""
    d = config["distill"]
    policy = "dx" if config["student"]["policy"] == "x0" else config["student"]["policy"]
    try:
        return PiFlow(student, teacher, policy=policy, nfe=d["nfe"], final_step_size_scale=d["final_step_size_scale"],
                      shift=d["shift"], num_intermediate_states=d["num_intermediate_states"],
                      window_substeps=d["window_substeps"],
                      gm_dropout=d["gm_dropout"] if policy in ("gm", "gmflow") else 0.0, loss_scale=d["loss_scale"],
                      total_substeps=d["total_substeps"], num_decay_iters=d["num_decay_iters"],
                      policy_kwargs={"mode": config["student"]["dx_mode"]} if policy == "dx" else None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"distill/student settings: {error}") from None


def save_safetensors(state: dict, path: Path) -> None:
    _save_safetensors(path, state)


def load_weights(module: torch.nn.Module, path: Path, what: str = "weights file") -> torch.nn.Module:
    """Load a safetensors state dict into `module` (strict); a corrupt file or one that does not fit the module
    (e.g. edited config.yaml) is a one-line `CheckpointError` naming the file."""
    from piflow.errors import CheckpointError
    from piflow.files import first_non_finite, load_safetensors, one_line

    try:
        state = load_safetensors(path, what)
    except (ValueError, FileNotFoundError) as error:
        raise CheckpointError(str(error)) from None
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{what} {path}: tensor {bad!r} holds NaN or Inf values")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{what} {path} does not match the model its config.yaml describes "
                              f"({one_line(error, 300)})") from None
    return module
