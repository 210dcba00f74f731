"""Writing and reading piflow's files safely: atomic writes, strict JSON, safetensors.

* `atomic_write` writes to a temporary file next to the target, fsyncs it and renames it over the target, so a
  crash, a full disk or a kill at any moment leaves either the old file or the new one — never a mix. A failed
  write (e.g. ``ENOSPC``) removes the temporary file and raises an `OSError` that says the target is unchanged.
* `write_json` / `json_line` write strict JSON (RFC 8259): NaN and ±Inf, which Python's `json` would write as the
  invalid tokens ``NaN``/``Infinity``, become ``null``.
* Nothing here unpickles: tensors are read from safetensors, everything else from JSON or YAML (safe loader).
* Files are created with the permissions the umask allows (``0o666`` minus the umask, applied by the kernel when
  the temporary file is opened), not ``mkstemp``'s private ``0o600``; replacing a file keeps its permissions.

Test seam: `write_hook` is None in production, and then a write is one ``write`` call with no extra work. A test
may set it (``monkeypatch.setattr(piflow.files, "write_hook", hook)``, or tests/reliability/kill_at.py for a CLI
subprocess) to a function ``hook(stage, path)`` called by `atomic_write` at ``"write-partial"`` (the temporary
file holds the first half of the bytes; with a hook installed, byte data is written in two halves) and at
``"write-before-rename"`` (the temporary file is complete and synced, not yet renamed). piflow never reads an
environment variable for this.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional, Union

from piflow.errors import DataError

PathLike = Union[str, os.PathLike]

WriteHook = Callable[[str, Path], None]
write_hook: Optional[WriteHook] = None
"""Test seam (see the module docstring): None, or ``hook(stage, path)`` called inside `atomic_write`."""


def cache_dir() -> Path:
    """piflow's cache folder: ``$PIFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/piflow``, else ``~/.cache/piflow``."""
    if os.environ.get("PIFLOW_CACHE_DIR"):
        return Path(os.environ["PIFLOW_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "piflow"


def atomic_write(path: PathLike, data: Union[bytes, Callable[[Any], None]]) -> None:
    """Write `data` (bytes, or a function that writes to a binary file object) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hook = write_hook
    fd, tmp_name = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod") and path.exists():
                os.fchmod(handle.fileno(), path.stat().st_mode & 0o7777)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                data(handle)
            elif hook is None:
                handle.write(data)
            else:
                view = memoryview(data)
                handle.write(view[:len(view) // 2])
                handle.flush()
                hook("write-partial", path)
                handle.write(view[len(view) // 2:])
            handle.flush()
            os.fsync(handle.fileno())
        if hook is not None:
            hook("write-before-rename", path)
        os.replace(tmp_name, path)
    except OSError as error:
        _remove_quietly(tmp_name)
        state = "was left unchanged" if path.exists() else "was not created"
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}; {path} {state}") from error
    except BaseException:
        _remove_quietly(tmp_name)
        raise


def _create_temporary(path: Path) -> tuple[int, str]:
    """Create a new, empty ``.<name>.<random>.tmp`` next to `path`; (descriptor, name). Opened with mode 0o666, so
    the kernel applies the process's current umask (thread-safe, unlike reading the umask with `os.umask`)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}: 100 random names were taken")


def remove_stale_temporary_files(directory: PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_write`s killed mid-write left in `directory` (call only while
    holding the directory's lock, so that no live writer owns them); returns what was removed."""
    removed = []
    for path in Path(directory).glob(".*.tmp"):
        if path.is_file():
            _remove_quietly(str(path))
            removed.append(path)
    return removed


def _remove_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (recursively through dicts, lists and tuples)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def dumps_json(data: Any, indent: Optional[int] = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of `data` (non-finite floats → null)."""
    return json.dumps(strict_json(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: PathLike, data: Any, sort_keys: bool = False) -> None:
    """Write `data` to `path` as strict JSON, atomically."""
    atomic_write(path, (dumps_json(data, sort_keys=sort_keys) + "\n").encode("utf-8"))


def json_line(record: dict) -> str:
    """One strict-JSON line (for ``.jsonl`` logs), newline included."""
    return dumps_json(record, indent=None) + "\n"


def read_json(path: PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing or invalid file raises FileNotFoundError / ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{what} {path} is not valid JSON ({error})") from None


def yaml_loader():
    """The YAML loader of every config file and override: yaml.SafeLoader that refuses a key given twice in one
    mapping (YAML would silently keep the last) and reads exponent numbers without a dot (``1e-3``, ``2E5``) as
    floats, as YAML 1.2 does (PyYAML's YAML 1.1 reads them as strings), so that a number is never a string and a
    quoted "5" is never a number."""
    import re

    import yaml

    class UniqueKeySafeLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":     # `<<: *anchor` merges; explicit keys override
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    UniqueKeySafeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                              list("-+0123456789"))
    return UniqueKeySafeLoader


def read_yaml(path: PathLike, what: str = "config file") -> Any:
    """Parse a YAML file with the safe loader (no Python objects, no duplicate keys); a missing, undecodable or
    invalid file raises a `ConfigError` naming it. An empty file is an empty mapping."""
    import yaml

    from piflow.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=yaml_loader()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} {path} is not valid YAML ({one_line(error, 200)})") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to be a config") from None


def save_safetensors(path: PathLike, tensors: dict, metadata: Optional[dict[str, str]] = None) -> None:
    """Write a dict of tensors as a safetensors file, atomically (tensors are made contiguous and moved to CPU)."""
    from safetensors.torch import save

    atomic_write(path, save({key: value.detach().contiguous().cpu() for key, value in tensors.items()},
                            metadata=metadata))


def load_safetensors(path: PathLike, what: str = "weights file", device: str = "cpu") -> dict:
    """Read a safetensors file (never executes code); a missing or corrupt file raises FileNotFoundError /
    ValueError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:      # SafetensorError, OSError, … : a file that is not safetensors
        raise DataError(f"{what} {path} is not a readable safetensors file ({type(error).__name__}: "
                        f"{first_line(error)})") from None


def first_non_finite(tensors: dict) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or ±Inf, or None."""
    import torch

    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(value: Any, limit: Optional[int] = None) -> str:
    """`str(value)` with all whitespace runs collapsed to single spaces (an error's type name if that is empty),
    cut to `limit` characters with " …" — for one-line error messages that quote another library's message."""
    text = " ".join(str(value).split()) or (type(value).__name__ if isinstance(value, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[:limit] + " …"
