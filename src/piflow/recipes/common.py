"""The skeleton every recipe runs (`run_recipe`: run directory, resolved config, training, weights, loss plot,
metrics) and the pieces they share: config sections built from the typed defaults (`TrainConfig`, `PiIDSettings`),
`PiFlow` from a config, the π-ID loss function of the training loop, up-front settings checks."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from piflow.checks import is_int
from piflow.config import ConfigError, dataclass_defaults, load_config
from piflow.errors import UserError
from piflow.files import one_line, save_safetensors, write_json
from piflow.methods import DistillSetup, make_method
from piflow.settings import PiIDSettings
from piflow.train import TrainConfig
from piflow.train.loggers import log_run_outputs
from piflow.train.loop import LossFn, TrainResult, train
from piflow.train.run_dir import start_run


@contextmanager
def config_values(section: str):
    """Inside: a ValueError from a constructor that checks configured values (a model, a dataset, a student) is
    turned into a one-line `ConfigError` naming `section`; errors of the training itself are not touched."""
    try:
        yield
    except UserError:
        raise
    except ValueError as error:
        raise ConfigError(f"{section} settings: {one_line(error)}") from None


def train_defaults(**overrides) -> dict:
    """The ``train`` config section: `TrainConfig`'s defaults (the single source) with a recipe's `overrides`."""
    return dataclass_defaults(TrainConfig, **overrides)


def distill_defaults(**overrides) -> dict:
    """The ``distill`` config section: `PiIDSettings`' defaults (its policy comes from ``student.policy``), the
    recipe keys ``data_free``, ``batch_size`` (every method's batch) and ``x0_bank_size`` (the x0 method's
    teacher trajectories), and a recipe's `overrides`."""
    section = dataclass_defaults(PiIDSettings)
    del section["policy"]
    section.update(data_free=False, batch_size=64, x0_bank_size=4096)
    section.update(overrides)
    return section


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
# sane upper limits of sizes a typo can make absurd (an hours-long silent run or an out-of-memory crash instead of
# an error); each names its limit in the error
MAX_STEPS = 1000             # NFE and teacher steps (the paper samples with 1-8 NFE; teachers with up to ~250 steps)
MAX_SAMPLES = 1_000_000      # samples of one evaluation or `piflow sample` call
MAX_RESOLUTION = 8192        # pixels per side of a text-to-image run
CAPS = {"distill.nfe": MAX_STEPS, "eval.teacher_steps": MAX_STEPS, "eval.student_nfe": MAX_STEPS,
        "eval.nfe": MAX_STEPS, "eval.num_samples": MAX_SAMPLES, "resolution": MAX_RESOLUTION}


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_settings(config: dict) -> None:
    """A `ConfigError` naming the first bad batch size, sample count, step list or temperature, so that a run never
    trains to the end and then fails in its evaluation."""
    from piflow.schedule import resolve_temperature

    for key in POSITIVE_INTEGERS:
        value = _lookup(config, key)
        if value is not _MISSING and not (is_int(value) and value >= 1):
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    for key in STEP_LISTS:
        value = _lookup(config, key)
        if value is not _MISSING and not (isinstance(value, list) and all(is_int(v) and v >= 1 for v in value)):
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
                                           and all(is_int(v) and v >= 1 for v in resolution)):
        raise ConfigError(f"resolution must be [height, width] in pixels, got {resolution!r}")
    prompts = _lookup(config, "eval.prompts")
    if prompts is not _MISSING and not (isinstance(prompts, list) and all(isinstance(v, str) for v in prompts)):
        raise ConfigError(f"eval.prompts must be a list of strings, got {prompts!r}")
    seed = _lookup(config, "eval.seed")
    if seed is not _MISSING and not (is_int(seed) and seed >= 0):
        raise ConfigError(f"eval.seed must be an integer >= 0, got {seed!r}")
    for key, cap in CAPS.items():
        value = _lookup(config, key)
        values = value if isinstance(value, list) else [value]
        if value is not _MISSING and any(is_int(v) and v > cap for v in values):
            raise ConfigError(f"{key} must be at most {cap}, got {value!r}")


def check_dataset(name, allowed=None) -> None:
    """A `ConfigError` naming ``dataset`` and every valid name (2-D and image) unless `name` is one of them (or of
    `allowed`, the names a particular recipe takes)."""
    from piflow.data import IMAGE_DATASET_NAMES, TOY_DATASET_NAMES
    from piflow.data.images import LABELS_ONLY

    names = tuple(allowed) if allowed is not None else TOY_DATASET_NAMES + IMAGE_DATASET_NAMES + (LABELS_ONLY,)
    if name not in names:
        raise ConfigError(f"dataset must be one of {list(names)}, got {name!r}")


def seed_initialisation(config: dict) -> None:
    """Seed torch's global generator with ``train.seed`` before a recipe builds its networks, so that weight
    initialisation (nn.Linear defaults, Xavier, LoRA A) and hence whole runs are reproducible."""
    torch.manual_seed(int(config["train"]["seed"]))


def missing_teacher_run(run: Path, holds: str, kinds: str = "") -> ConfigError:
    """The one-line error for a ``teacher`` run directory without `holds`: a moved or deleted one names where it
    was expected and how to point to its new place (``teacher=NEW_PATH``)."""
    if not run.exists():
        return ConfigError(f"teacher run directory {run} does not exist (moved or deleted?); point to its new place "
                           f"with teacher=NEW_PATH (an override of `piflow sample` / `piflow evaluate`; resuming "
                           f"`piflow distill` with it also needs --allow-config-change)")
    return ConfigError(f"teacher must be {kinds}a `piflow train-teacher` run directory holding {holds}; {run} has "
                       "none")


def finished_distill_run(run_dir: Path, defaults: dict, overrides=()) -> tuple[dict, Path]:
    """(resolved config, student weights path) of a finished `piflow distill` run, or a RunDirError."""
    from piflow.errors import RunDirError

    config_path, weights = run_dir / "config.yaml", run_dir / "student.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise RunDirError(f"{run_dir} is not a finished distillation run (needs config.yaml and student.safetensors; "
                          f"rerun its `piflow distill` command to finish it)")
    return load_config(defaults, config_path, overrides), weights


def run_recipe(config: dict, run_dir: Path, command: str, allow_config_change: bool, model: torch.nn.Module,
               loss_fn: LossFn, finish: Callable[[TrainResult], dict], loss_title: str,
               train_section: Optional[dict] = None, is_main: bool = True) -> dict:
    """The one run skeleton of `piflow train-teacher` and `piflow distill` (every recipe).

    Starts (or resumes) the run directory `run_dir` (config.yaml written once training starts; a different config
    is refused unless `allow_config_change`), trains `model` with `loss_fn` (``train`` section, or
    `train_section`), then `finish(result)` saves the weights and evaluates (returns the metrics); the loss curve
    goes to loss.png and the metrics, with ``train_seconds`` (the loop's wall time over every invocation,
    `TrainResult.train_seconds`; null for a run resumed from a checkpoint that predates it), to metrics.json (by the
    main rank)."""
    settings = train_config({"train": train_section if train_section is not None else config["train"]})
    with start_run(run_dir, config, command, allow_config_change) as run:
        result = train(model, loss_fn, settings, run_dir, desc="teacher" if command == "train-teacher"
                       else "distill", on_start=run.commit)
        metrics = dict(finish(result))
        metrics.setdefault("train_seconds", result.train_seconds)
        if is_main:
            from piflow.recipes import plots

            plots.plot_loss_curve(result.history, run_dir / "loss.png", loss_title)
            write_json(run_dir / "metrics.json", metrics)
            log_run_outputs(settings.logger, run_dir, metrics, settings.iters, project=settings.wandb_project)
        return metrics


def distill_run(run_dir: Path, allow_config_change: bool, setup: DistillSetup,
                evaluate: Callable[[Any], dict]) -> dict:
    """`piflow distill` of any method (``method`` in the config) through the one run skeleton: the method builds
    the student and its loss from `setup`; after training the EMA student's weights go to student.safetensors
    and `evaluate(sampler)` gives the metrics. Every setting is checked before the run directory is touched."""
    method = make_method(setup)
    config = method.config_as_run()
    student = method.student()
    loss_fn = method.loss_fn(student)

    def finish(result) -> dict:
        save_safetensors(run_dir / "student.safetensors", result.ema.model.state_dict())
        final_loss = result.history[-1]["loss"] if result.history else None
        return {"final_loss": final_loss, **evaluate(method.sampler(result.ema.model.eval()))}

    train_section = dict(config["train"], iters=method.loop_iterations(config["train"]["iters"]))
    return run_recipe(config, run_dir, "distill", allow_config_change, student, loss_fn, finish, method.loss_title,
                      train_section=train_section)


def load_distilled(setup: DistillSetup, weights: Path):
    """The sampler of a finished distillation run of any method: its student rebuilt from `setup` (the run's
    config) and loaded from `weights`."""
    method = make_method(setup)
    student = load_weights(method.student(), weights, "student weights")
    return method.sampler(student.eval().requires_grad_(False))


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
