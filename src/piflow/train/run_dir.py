"""Run directories: one writer at a time, and a saved config that a later command cannot silently replace.

* `run_lock(directory)` holds an exclusive lock on ``<directory>/.piflow.lock`` (``flock``: released by the kernel
  when the holder exits, however it exits) and writes the holder's PID, host and start time into it. A second
  process gets a `RunDirError` at once naming the holder. A lock file whose holder is gone is *stale*: it is taken
  over with a warning. Re-entrant within a process (a recipe and the training loop it calls share it).
* `start_run(directory, config, command)` validates the directory, takes the lock and, when the directory already
  holds a run (a checkpoint or results), compares the new config with the saved ``config.yaml``: a difference in
  any setting that changes results is refused with the list of differing keys, unless ``allow_config_change``,
  which records the change in ``run.json``. `RESULT_NEUTRAL_KEYS` (logging, progress, checkpoint cadence) may
  differ freely. Nothing is written before these checks pass. Local paths (``teacher``, ``prompts``, …) are saved
  absolute and compared as resolved (`piflow.config.absolute_paths`), so a run works from any directory.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from piflow.errors import RunDirError
from piflow.files import atomic_write, one_line, read_json, read_yaml, write_json
from piflow.train.checkpoint import CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME

LOCK_NAME = ".piflow.lock"
RUN_RECORD = "run.json"
CONFIG_NAME = "config.yaml"
# settings that cannot change what a run computes: they may differ between a run and its resumption
RESULT_NEUTRAL_KEYS = frozenset({"train.progress", "train.log_every", "train.checkpoint_every",
                                 "train.max_skipped_steps", "train.logger", "train.wandb_project"})

_HELD: dict[str, int] = {}         # resolved lock path → file descriptor of the lock this process holds


def _lock_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:500]}


def _read_holder(fd: int) -> Optional[dict]:
    """The lock file's JSON (None if empty, {} if unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    return holder if isinstance(holder, dict) else {}


def _describe(holder: Optional[dict]) -> str:
    """Who holds the lock, from the fields piflow writes (never the raw file content)."""
    if not holder or "pid" not in holder:
        return "another process (unreadable lock information)"
    fields = {key: one_line(holder.get(key, "?"), 200) for key in ("pid", "host", "since", "command")}
    return f"PID {fields['pid']} on host {fields['host']} (since {fields['since']}: {fields['command']})"


def _try_exclusive(fd: int) -> Optional[bool]:
    """True: locked; False: held by another process; None: this platform/filesystem has no flock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:                # e.g. ENOLCK / EOPNOTSUPP on some network filesystems
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block (see the module docstring)."""
    directory = Path(directory)
    path = directory / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:                   # already held by this process (a recipe, then its training loop)
        yield
        return
    if path.is_symlink():
        raise RunDirError(f"{path} is a symbolic link; piflow refuses to lock (and so to truncate) what it points "
                          f"to: delete it")
    try:              # O_NOFOLLOW: a link planted between the check and the open is refused too
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as error:
        raise RunDirError(f"cannot lock run directory {directory}: {error.strerror or error} ({path})") from None
    info = os.fstat(fd)
    if not os.path.samestat(info, os.stat(path, follow_symlinks=False)) or not os.path.isfile(path) \
            or info.st_nlink > 1:
        os.close(fd)
        raise RunDirError(f"{path} is not a regular file of its own (a link?); piflow refuses to truncate it: "
                          f"delete it")
    try:
        locked = _try_exclusive(fd)
        holder = _read_holder(fd)
        if locked is False:
            raise RunDirError(f"run directory {directory} is in use by {_describe(holder)}; wait for that command "
                              f"to finish or use another --run-dir")
        if locked is None and holder and holder.get("host") == socket.gethostname() \
                and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]):
            raise RunDirError(f"run directory {directory} is in use by {_describe(holder)} (no file locking here: "
                              f"if that process is gone, delete {path})")
        if holder is not None:                     # something was written there and nobody holds it any more
            print(f"piflow: warning: {path} was left by {_describe(holder)}, which no longer holds it (stale lock); "
                  f"taking it over", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_lock_info()) + "\n").encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.ftruncate(fd, 0)      # empty = free; the file stays so that no two processes lock different inodes
        finally:
            os.close(fd)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: config}


def config_differences(old: dict, new: dict, neutral: frozenset = RESULT_NEUTRAL_KEYS) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for the settings that differ, result-neutral keys left out. A key that
    one side lacks and the other holds as null (a setting added later whose null default keeps the old behaviour)
    is no change; older key names are compared under their new names (`piflow.config.upgrade_config`), and local
    paths as resolved from the current directory (`piflow.config.absolute_paths`: an older run's relative
    ``teacher`` equals the same folder given absolute)."""
    from piflow.config import absolute_paths, upgrade_config

    flat_old = _flatten(absolute_paths(upgrade_config(old, new, saved_run=True)))
    flat_new = _flatten(absolute_paths(new))
    missing = object()
    changes = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, missing), flat_new.get(key, missing)
        absent_or_null = (a is missing and b is None) or (b is missing and a is None)
        if key in neutral or _same(a, b) or absent_or_null:
            continue
        changes[key] = (None if a is missing else a, None if b is missing else b)
    return changes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def has_results(directory: Path) -> bool:
    """True when the directory holds training state or results that a config change would misdescribe."""
    return any((directory / name).exists() for name in (CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME, "metrics.json"))


def check_run_dir(directory: Path, option: str = "--run-dir") -> None:
    """A one-line `RunDirError` if `directory` exists but is not a directory."""
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{option} {directory} exists and is not a directory")


class Run:
    """A started run: the checks have passed and the lock is held; `commit` writes ``config.yaml`` and ``run.json``.

    The training loop commits once it has loaded (and so validated against the model) the run's checkpoint, so that
    a command that fails before that — an allowed config change that does not fit the checkpoint, a full disk —
    leaves the saved config describing the checkpoint it was trained with. Non-zero torchrun ranks get a `Run`
    whose `commit` does nothing."""

    def __init__(self, directory: Path, config: Optional[dict] = None, record: Optional[dict] = None):
        self.directory, self._config, self._record = Path(directory), config, record

    def commit(self) -> None:
        if self._config is None:
            return
        config, record, self._config = self._config, self._record, None
        atomic_write(self.directory / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False).encode("utf-8"))
        write_json(self.directory / RUN_RECORD, record)


def _prepare(directory: Path, config: dict, command: str, allow_config_change: bool) -> Run:
    """All checks of `start_run` (nothing is written); returns the `Run` whose commit writes the config."""
    record_path, config_path = directory / RUN_RECORD, directory / CONFIG_NAME
    record = read_json(record_path, "run record") if record_path.is_file() else {}
    if not isinstance(record, dict) or not isinstance(record.get("config_changes", []), list):
        raise RunDirError(f"run record {record_path} is not a piflow run record (a JSON object); delete it if this "
                          f"directory holds no run you need")
    if record.get("command") not in (None, command):
        raise RunDirError(f"{directory} holds a `piflow {record['command']}` run, not a `piflow {command}` run; "
                          f"use another --run-dir")
    changes: dict[str, tuple] = {}
    if config_path.is_file() and has_results(directory):
        saved = read_yaml(config_path, "the run's config")
        if not isinstance(saved, dict):
            raise RunDirError(f"the run's config {config_path} must hold a mapping")
        changes = config_differences(saved, config)
        if changes and not allow_config_change:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in
                               ((k, *v) for k, v in changes.items()))
            raise RunDirError(f"{directory} holds a run made with a different config ({listed}); use another "
                              f"--run-dir, or pass --allow-config-change to continue this run with the new "
                              f"settings (recorded in {record_path})")
    record = dict(record, command=command, format="piflow-run-v1")
    record.setdefault("created", time.strftime("%Y-%m-%d %H:%M:%S"))
    if changes:
        record["config_changes"] = list(record.get("config_changes", [])) + [
            {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
             "changes": {key: {"old": old, "new": new} for key, (old, new) in changes.items()}}]
    from piflow.config import absolute_paths

    return Run(directory, absolute_paths(config), record)      # saved with absolute paths: usable from anywhere


@contextmanager
def start_run(directory: Path, config: dict, command: str, allow_config_change: bool = False) -> Iterator[Run]:
    """Validate and lock `directory` and check `config` against a saved run's; yields a `Run` with the lock held.
    Its `commit` (called by the training loop once the checkpoint has loaded, and at the end of the block if it
    ended without an error) writes ``config.yaml`` and ``run.json``. Under torchrun only rank 0 touches the
    directory, and if it fails every rank raises the same error."""
    from piflow.train import distributed

    directory = Path(directory)
    info = distributed.current()
    if not info.is_main:
        distributed.raise_if_main_failed(None)
        yield Run(directory)
        return
    stack = ExitStack()
    try:
        check_run_dir(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"cannot create run directory {directory}: {error.strerror or error}") from None
        stack.enter_context(run_lock(directory))
        run = _prepare(directory, config, command, allow_config_change)
    except BaseException as error:
        stack.close()
        if info.enabled:
            distributed.raise_if_main_failed(error)
        raise
    if info.enabled:
        distributed.raise_if_main_failed(None)
    with stack:
        yield run
        run.commit()
