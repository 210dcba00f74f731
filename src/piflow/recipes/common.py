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
    """The `TrainConfig` of a recipe config's ``train`` section; a bad value is a `ConfigError` naming it."""
    try:
        return TrainConfig(**config["train"])
    except ValueError as error:
        raise ConfigError(str(error)) from None


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
    """(resolved config, student weights path) of a finished `piflow distill` run, or a ConfigError."""
    config_path, weights = run_dir / "config.yaml", run_dir / "student.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir} is not a finished distillation run (needs config.yaml and student.safetensors)")
    return load_config(defaults, config_path, overrides), weights


def build_pipeline(config: dict, student: torch.nn.Module, teacher) -> PiFlow:
    """`PiFlow` from a config's ``student``/``distill`` sections ("x0" students are one-node DX policies)."""
    d = config["distill"]
    policy = "dx" if config["student"]["policy"] == "x0" else config["student"]["policy"]
    return PiFlow(student, teacher, policy=policy, nfe=d["nfe"], final_step_size_scale=d["final_step_size_scale"],
                  shift=d["shift"], num_intermediate_states=d["num_intermediate_states"],
                  window_substeps=d["window_substeps"],
                  gm_dropout=d["gm_dropout"] if policy in ("gm", "gmflow") else 0.0, loss_scale=d["loss_scale"],
                  total_substeps=d["total_substeps"], num_decay_iters=d["num_decay_iters"],
                  policy_kwargs={"mode": config["student"]["dx_mode"]} if policy == "dx" else None)


def save_safetensors(state: dict, path: Path) -> None:
    _save_safetensors(path, state)


def load_weights(module: torch.nn.Module, path: Path, what: str = "weights file") -> torch.nn.Module:
    """Load a safetensors state dict into `module` (strict); a corrupt file or one that does not fit the module
    (e.g. edited config.yaml) is a one-line `CheckpointError` naming the file."""
    from piflow.errors import CheckpointError
    from piflow.files import load_safetensors

    try:
        state = load_safetensors(path, what)
    except (ValueError, FileNotFoundError) as error:
        raise CheckpointError(str(error)) from None
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{what} {path} does not match the model its config.yaml describes ({detail})") \
            from None
    return module
