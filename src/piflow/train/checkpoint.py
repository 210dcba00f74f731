"""Atomic checkpoints: written to a temporary file in the same folder, fsynced, then renamed over the old one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


def atomic_write(path: Union[str, Path], write_fn) -> None:
    """Call ``write_fn(file_object)`` on a temp file next to `path`, then atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def save_checkpoint(path: Union[str, Path], state: dict[str, Any]) -> None:
    """Save `state` (tensors, state dicts, RNG states, step) atomically: a crash never leaves a half-written file."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with a clear error if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # truncated zip, pickle garbage, …
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a piflow training checkpoint (no 'step' entry)")
    return state
