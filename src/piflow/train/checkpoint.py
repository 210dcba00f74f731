"""Training checkpoints that never execute code: tensors in safetensors, the rest as JSON in its header.

A training state (model and EMA tensors, optimizer and scheduler state dicts, RNG states, step, history) is a tree
of dicts, lists, tuples, numbers, strings, None and tensors. `save_checkpoint` stores every tensor under its path
in the tree (``model/blocks.0.weight``, ``optimizer/state/0/exp_avg``) and the tree itself, with tensors replaced by
references, as strict JSON in the safetensors metadata (the one key ``piflow_checkpoint``: ``{"format", "state"}``;
one key, so that the same state always gives the same bytes). Loading reads only tensor bytes and
JSON, so a crafted file cannot run code (unlike `torch.load` of a pickle). Non-string dict keys (the optimizer's
integer parameter ids), tuples and non-finite floats are tagged so that the loaded tree equals the saved one.
Writes are atomic (temporary file, fsync, rename).

piflow ≤ 0.1 wrote ``checkpoint.pt`` pickles; they are refused with a message. `convert_legacy_checkpoint` (CLI:
``piflow convert-checkpoint``) turns one you trust into the safe format through PyTorch's restricted
``weights_only`` unpickler (torch ≥ 2.6, whose unpickler has no known code-execution hole).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

import torch

from piflow.errors import CheckpointError
from piflow.files import atomic_write, dumps_json, first_line

CHECKPOINT_NAME = "checkpoint.safetensors"
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "piflow-checkpoint-v2"
_STATE_KEY = "piflow_checkpoint"      # the only metadata key (safetensors orders several keys at random)

__all__ = ["CHECKPOINT_NAME", "LEGACY_CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "convert_legacy_checkpoint", "encode_state", "decode_state"]


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, {tensor key: tensor}) for a state tree; raises TypeError for other leaf types."""
    tensors: dict[str, torch.Tensor] = {}
    same_tensor: dict[tuple, str] = {}      # (storage, offset, shape, stride, dtype) → key: tied tensors
    storages: set[int] = set()

    def tensor_ref(value: torch.Tensor, path: str) -> dict:
        key = path or "tensor"
        if key in tensors:
            raise ValueError(f"two tensors map to the checkpoint key {key!r}")
        value = value.detach().cpu()
        if value.numel():
            storage = value.untyped_storage().data_ptr()
            identity = (storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
            if identity in same_tensor:           # a tied tensor: stored once, referenced twice
                return {"$tensor": same_tensor[identity]}
            same_tensor[identity] = key
            if storage in storages or not value.is_contiguous():
                value = value.contiguous().clone()   # safetensors refuses overlapping memory
            storages.add(storage)
        tensors[key] = value
        return {"$tensor": key}

    def encode(value: Any, path: str) -> Any:
        if torch.is_tensor(value):
            return tensor_ref(value, path)
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, tuple):
            return {"$tuple": [encode(item, f"{path}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}/{i}") for i, item in enumerate(value)]
        if isinstance(value, dict):
            plain = all(isinstance(k, str) and not k.startswith("$") for k in value)
            if plain:
                return {k: encode(v, f"{path}/{k}" if path else k) for k, v in value.items()}
            return {"$dict": [[encode(k, f"{path}/key{i}"), encode(v, f"{path}/{k}" if path else str(k))]
                              for i, (k, v) in enumerate(value.items())]}
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {path or 'the top level'})")

    return encode(state, ""), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_state`."""
    if isinstance(tree, list):
        return [decode_state(item, tensors) for item in tree]
    if isinstance(tree, dict):
        if len(tree) == 1:
            (tag, body), = tree.items()
            if tag == "$tensor":
                if body not in tensors:
                    raise CheckpointError(f"the checkpoint's state refers to a missing tensor {body!r}")
                return tensors[body]
            if tag == "$float":
                return float(body)
            if tag == "$tuple":
                return tuple(decode_state(item, tensors) for item in body)
            if tag == "$dict":
                return {decode_state(k, tensors): decode_state(v, tensors) for k, v in body}
        return {key: decode_state(value, tensors) for key, value in tree.items()}
    return tree


def save_checkpoint(path: Union[str, Path], state: dict[str, Any]) -> None:
    """Save a training state atomically in the safe format (see the module docstring)."""
    from safetensors.torch import save

    tree, tensors = encode_state(state)
    data = save(tensors, metadata={_STATE_KEY: dumps_json({"format": FORMAT, "state": tree}, indent=None)})
    atomic_write(path, data)


def _legacy_message(path: Path) -> str:
    legacy = path.with_name(LEGACY_CHECKPOINT_NAME)
    how = (f"convert it with `piflow convert-checkpoint {legacy}` (writes {legacy.with_name(CHECKPOINT_NAME)})"
           if path == legacy else
           f"rename it to {legacy} and convert it with `piflow convert-checkpoint {legacy}`")
    return (f"checkpoint {path} is in piflow's old pickle format, which piflow no longer loads because unpickling "
            f"a file can run arbitrary code; if you trust its origin, {how}")


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; a missing, corrupt, legacy or foreign file raises a
    `CheckpointError` naming it. Nothing in the file is executed."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        if path.name == CHECKPOINT_NAME and path.with_name(LEGACY_CHECKPOINT_NAME).is_file():
            raise CheckpointError(_legacy_message(path.with_name(LEGACY_CHECKPOINT_NAME)))
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not _looks_like_safetensors(path) and _is_pickle(path):
        raise CheckpointError(_legacy_message(path))
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as handle:
            metadata = handle.metadata() or {}
            record = json.loads(metadata[_STATE_KEY]) if _STATE_KEY in metadata else {}
            if not isinstance(record, dict) or record.get("format") != FORMAT or "state" not in record:
                found = record.get("format") if isinstance(record, dict) else None
                raise CheckpointError(f"checkpoint {path} is a safetensors file but not a piflow training "
                                      f"checkpoint (format {found!r}, expected {FORMAT!r})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        state = decode_state(record["state"], tensors)
    except CheckpointError:
        raise
    except Exception as error:      # truncated file, bad header, bad JSON
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: "
                              f"{first_line(error)}); "
                              f"delete it to start over or restore it from a copy") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a piflow training checkpoint (no 'step' entry)")
    return state


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length that fits the file, then '{'."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _is_pickle(path: Path) -> bool:
    """True for files torch.save / pickle wrote: a zip archive (torch ≥ 1.6) or a pickle stream (protocol 2–5)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                    b"\x05"))


def convert_legacy_checkpoint(path: Union[str, Path]) -> Path:
    """Convert a piflow ≤ 0.1 ``checkpoint.pt`` into ``checkpoint.safetensors`` next to it (the old file is kept).

    Uses ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers and refuses any other
    object; on torch < 2.6 that unpickler had a known code-execution hole (CVE-2025-32434), so it is refused there.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LEGACY_CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.with_name(CHECKPOINT_NAME).exists():
        raise CheckpointError(f"{path.with_name(CHECKPOINT_NAME)} already exists (a newer checkpoint, written since "
                              f"the run resumed?); refusing to overwrite it with {path} — delete it first if you "
                              f"really mean to")
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 6):
        raise CheckpointError(f"converting {path} needs torch >= 2.6 (its restricted unpickler); this is torch "
                              f"{torch.__version__}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be converted: it is corrupt or holds objects other than "
                              f"tensors and plain containers ({type(error).__name__}: {first_line(error)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a piflow training checkpoint (no 'step' entry)")
    target = path.with_name(CHECKPOINT_NAME)
    save_checkpoint(target, state)
    return target
