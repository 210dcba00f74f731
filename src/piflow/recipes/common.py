"""Pieces shared by the 2-D and image recipes: training defaults, π-ID pipeline from a config, atomic writers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from piflow.config import ConfigError, load_config
from piflow.pipeline import PiFlow
from piflow.train.checkpoint import atomic_write

TRAIN_DEFAULTS = dict(iters=1000, lr=1e-3, betas=[0.9, 0.95], weight_decay=0.0, warmup_iters=100, grad_clip=50.0,
                      grad_clip_from=100, ema_gamma=7.0, ema_start=100, checkpoint_every=500, log_every=50, seed=0,
                      progress=True, grad_accum_steps=1, mixed_precision="no")


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
    from safetensors.torch import save as save_bytes

    data = save_bytes({k: v.contiguous() for k, v in state.items()})
    atomic_write(path, lambda handle: handle.write(data))


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2).encode()))
