"""Fault injection: SIGKILL inside file writes (between the temporary write and the rename, and half-way through the
write) and at random moments, then resume — the run continues byte-identically to an uninterrupted one; a full disk
leaves the run directory intact with a one-line error."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from piflow.train import load_checkpoint

from .conftest import KILL_AT, TINY_2D, cli_env, run_cli
from .kill_at import kill_hook


def _outcome(run_dir: Path) -> dict:
    """Everything a finished run computed (wall-clock fields removed)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return {"student": (run_dir / "student.safetensors").read_bytes(), "metrics": metrics,
            "log": (run_dir / "train_log.jsonl").read_text(),
            "history": load_checkpoint(run_dir / "checkpoint.safetensors")["history"]}


def assert_same_run(run_dir: Path, clean: Path) -> None:
    got, want = _outcome(run_dir), _outcome(clean)
    assert got["student"] == want["student"], "student weights differ from the uninterrupted run"
    assert got["metrics"] == want["metrics"]
    assert got["log"] == want["log"]                 # every iteration exactly once, same numbers
    assert got["history"] == want["history"]
    assert not list(run_dir.glob(".*.tmp")), "temporary files left behind"


_slow = pytest.mark.slow
KILL_POINTS = [pytest.param("write-partial:checkpoint.safetensors:2", marks=_slow),   # each ~15 s: 2 runs
               pytest.param("write-before-rename:checkpoint.safetensors:3", marks=_slow),
               pytest.param("write-before-rename:checkpoint.safetensors:6", marks=_slow),     # the final checkpoint
               pytest.param("write-partial:student.safetensors:1", marks=_slow),
               pytest.param("write-partial:train_log.jsonl:1", marks=_slow),
               pytest.param("write-before-rename:config.yaml:1", marks=_slow),
               pytest.param("write-partial:metrics.json:1", marks=_slow)]


@pytest.mark.parametrize("stage", ["write-partial", "write-before-rename"])
def test_the_kill_hook_reaches_a_subprocess_and_kills_it_mid_write(tmp_path, stage):
    """The seam the slow kill tests use, fast: a process killed on its 2nd write of data.bin leaves the 1st write's
    bytes in data.bin and the 2nd write's temporary file (half or all of its bytes) next to it."""
    code = (f"import sys; sys.path.insert(0, {str(KILL_AT.parent)!r})\n"
            "import piflow.files\nfrom kill_at import kill_hook\n"
            f"piflow.files.write_hook = kill_hook({stage + ':data.bin:2'!r})\n"
            f"piflow.files.atomic_write({str(tmp_path / 'other.bin')!r}, b'z' * 10)\n"
            f"piflow.files.atomic_write({str(tmp_path / 'data.bin')!r}, b'a' * 100)\n"
            f"piflow.files.atomic_write({str(tmp_path / 'data.bin')!r}, b'b' * 100)\n"
            "print('not killed')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=cli_env())
    assert result.returncode == -signal.SIGKILL and result.stdout == "", result.stderr[-2000:]
    assert (tmp_path / "data.bin").read_bytes() == b"a" * 100 and (tmp_path / "other.bin").read_bytes() == b"z" * 10
    temporary, = tmp_path.glob(".data.bin.*.tmp")
    assert temporary.read_bytes() == (b"b" * 50 if stage == "write-partial" else b"b" * 100)


def test_kill_points_are_checked():
    for bad in ("write-partial:x", "write-half:x:1", "write-partial::1", "write-partial:x:0"):
        with pytest.raises(ValueError, match="kill point must be STAGE:FILE:N"):
            kill_hook(bad)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_inside_a_file_write_then_resume(tmp_path, finished_run, point):
    run_dir = tmp_path / "run"
    killed = run_cli("distill", "--run-dir", str(run_dir), *TINY_2D, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point.startswith("write-partial:checkpoint"):          # the previous checkpoint is intact
        assert load_checkpoint(run_dir / "checkpoint.safetensors")["step"] == 5
        assert list(run_dir.glob(".checkpoint.safetensors.*.tmp"))    # the half-written temporary file
    resumed = run_cli("distill", "--run-dir", str(run_dir), *TINY_2D)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, finished_run)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    """Kills at seeded random moments of one run's life (start-up, training, checkpoint writes), each followed by a
    restart; the final result equals an uninterrupted run's. The moments are fractions of the measured length of
    that uninterrupted run, so the test means the same on a fast or a slow machine."""
    args = [*TINY_2D, "train.iters=400", "train.checkpoint_every=7"]
    clean = tmp_path / "clean"
    start = time.monotonic()
    assert run_cli("distill", "--run-dir", str(clean), *args).returncode == 0
    duration = time.monotonic() - start
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    command = [sys.executable, "-m", "piflow.cli", "distill", "--run-dir", str(run_dir), *args]
    kills = 0
    for attempt in range(20):
        process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 5:
            time.sleep(rng.uniform(0.1, 0.4) * duration)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        _, err = process.communicate(timeout=300)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, err.decode()
    assert process.returncode == 0 and kills >= 3, (kills, attempt, duration)
    assert_same_run(run_dir, clean)


class _FullDisk:
    """A binary file whose writes fail with ENOSPC once `budget` bytes have been written."""

    def __init__(self, handle, budget: int):
        self._handle, self._budget = handle, budget

    def write(self, data) -> int:
        if len(data) > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def test_full_disk_during_a_checkpoint_write(tmp_path, finished_run, monkeypatch, capsys):
    """The third checkpoint write hits ENOSPC: one-line error, exit 2, the previous checkpoint and the rest of the run
    directory intact, no temporary file left; once space is back the run resumes to the uninterrupted result."""
    import piflow.files
    from piflow.cli import main

    real_fdopen = os.fdopen
    writes = {"checkpoint": 0}

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if ".checkpoint.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            writes["checkpoint"] += 1
            if writes["checkpoint"] == 3:
                return _FullDisk(handle, budget=1000)
        return handle

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path / "run"
        monkeypatch.setattr(piflow.files.os, "fdopen", fdopen)
        assert main(["distill", "--run-dir", str(run_dir), *TINY_2D]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "No space left on device" in lines[0], lines
        assert "checkpoint.safetensors was left unchanged" in lines[0]
        assert load_checkpoint(run_dir / "checkpoint.safetensors")["step"] == 10
        assert not list(run_dir.glob(".*.tmp"))
        assert (run_dir / "config.yaml").is_file() and (run_dir / ".piflow.lock").read_text() == ""
        monkeypatch.undo()
        assert main(["distill", "--run-dir", str(run_dir), *TINY_2D]) == 0
    finally:
        torch.set_num_threads(previous_threads)
    assert_same_run(run_dir, finished_run)
