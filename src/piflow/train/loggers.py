"""Experiment trackers of training runs (``train.logger``): TensorBoard (the default, when installed), Weights &
Biases (``wandb``, an optional extra) or none. Every tracker gets the same things: the training scalars of each
iteration (train/loss, train/lr, train/grad_norm), the resolved config, and at the end of a run its figures (sample
grids, loss curve: the PNGs the recipe wrote) and its metrics.

W&B runs use the run directory's name and keep their id in ``<run_dir>/wandb_run_id``, so a resumed piflow run
continues the same W&B run; ``WANDB_MODE=offline`` (or ``wandb offline``) logs without a network, for
``wandb sync`` later.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Iterable, Optional

LOGGERS = ("tensorboard", "wandb", "none")
TRAIN_SCALARS = ("loss", "lr", "grad_norm")
WANDB_ID_FILE = "wandb_run_id"


class RunLogger:
    """What the training loop and the recipes log; the base class logs nothing."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def images(self, images: dict[str, Path], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, flattened with '/'."""
    import math

    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


class TensorBoardLogger(RunLogger):
    def __init__(self, run_dir: Path, config: Optional[dict]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if config is not None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, images: dict[str, Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for tag, path in images.items():
            with Image.open(path) as image:
                self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(f"metrics/{key}", value, 0)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(RunLogger):
    def __init__(self, run_dir: Path, config: Optional[dict], project: Optional[str]):
        from piflow.errors import require

        wandb = require("wandb", "train.logger=wandb")
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=project or "piflow", name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config or {})

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def images(self, images: dict[str, Path], step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path), caption=Path(path).name) for tag, path in images.items()},
                     step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(_numbers(metrics))

    def close(self) -> None:
        self.run.finish()


def check_logger(kind: str) -> str:
    if kind not in LOGGERS:
        raise ValueError(f"train.logger must be one of {LOGGERS}, got {kind!r}")
    return kind


def open_logger(kind: str, run_dir: Optional[Path], project: Optional[str] = None) -> RunLogger:
    """The tracker `kind` for `run_dir` (a `RunLogger` that logs nothing without a run directory, for ``none``,
    and for TensorBoard when it is not installed), with the run's resolved config.yaml when it exists."""
    check_logger(kind)
    if run_dir is None or kind == "none":
        return RunLogger()
    config = None
    config_path = Path(run_dir) / "config.yaml"
    if config_path.is_file():
        from piflow.files import read_yaml

        config = read_yaml(config_path)
    if kind == "wandb":
        return WandbLogger(Path(run_dir), config, project)
    try:
        return TensorBoardLogger(Path(run_dir), config)
    except ImportError:                      # tensorboard is an optional extra
        return RunLogger()


def log_run_outputs(kind: str, run_dir: Path, metrics: dict[str, Any], step: int,
                    figures: Iterable[Path] = (), project: Optional[str] = None) -> None:
    """After a run's evaluation: its figures (the PNGs in `run_dir`, or `figures`) and metrics to the tracker."""
    paths = list(figures) or sorted(Path(run_dir).glob("*.png"))
    logger = open_logger(kind, run_dir, project)
    try:
        if paths:
            logger.images({f"figures/{path.stem}": path for path in paths}, step)
        logger.summary(metrics)
    finally:
        logger.close()
