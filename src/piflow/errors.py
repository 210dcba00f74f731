"""The errors piflow raises for problems in what it was given, as opposed to bugs.

Every `UserError` is about the user's input or environment — a config, a data file, a checkpoint, a run directory, a
missing optional extra — and carries a message that names the argument or file and what was expected. The `piflow`
command prints such errors as one line and exits with `exit_code` (2; 3 when training diverged; 143 when terminated);
anything else is a bug and keeps its traceback. Each class also derives from the built-in exception that code written
before these classes existed expects (``ValueError`` for bad values, ``ImportError`` for missing extras, …).
"""
from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """A problem with piflow's input or environment (not a bug): shown as one line by the CLI."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """Unknown config key, wrong type, malformed override or an invalid combination of settings."""


class DataError(UserError, ValueError):
    """A data file that cannot be used: unreadable, wrong shape, or holding NaN/Inf (names the file and index)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt, in an unsafe legacy format, or does not match the model."""


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot be used: not a directory, in use by another process, or holding a run whose
    config differs from the one given."""


class TrainingDivergedError(UserError, RuntimeError):
    """Training stopped after too many consecutive non-finite (skipped) steps; the last checkpoint is kept."""

    exit_code = 3


class TrainingTerminated(UserError):
    """Training was asked to stop (SIGTERM: a job scheduler's preemption, `kill`) and stopped after writing a
    checkpoint of the step it had finished; the same command resumes it."""

    exit_code = 143                                 # 128 + SIGTERM, as a shell reports a terminated job


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


EXTRAS = {"diffusers": "diffusers", "peft": "diffusers", "transformers": "diffusers", "sklearn": "images",
          "PIL": "images", "scipy": "images", "tensorboard": "tensorboard", "gradio": "ui", "selenium": "test",
          "bitsandbytes": "imagenet", "torch_fidelity": "imagenet", "wandb": "wandb"}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise a `MissingExtraError` naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        if getattr(error, "name", None) not in (None, top, module):
            raise                     # the package is there but one of *its* imports failed: not a missing extra
        extra = EXTRAS.get(top)
        hint = f"pip install 'piflow[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(f"{purpose} needs the optional package {top!r}, which is not installed: {hint}") \
            from None
