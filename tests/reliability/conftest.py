"""Helpers of the fault-injection suite: a tiny 2-D distillation run through the real CLI, crafted pickles."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

# a 2-D π-ID run that finishes in a few seconds (exact ring8 teacher, small MLP student, 30 iterations)
TINY_2D = ["dataset=ring8", "teacher=exact", "student.hidden_size=32", "student.num_layers=2",
           "student.num_components=4", "distill.batch_size=32", "distill.total_substeps=16", "train.iters=30",
           "train.warmup_iters=5", "train.ema_start=5", "train.checkpoint_every=5", "eval.num_samples=100",
           "eval.teacher_steps=[]", "train.progress=false"]


def cli_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.update(extra)
    return env


KILL_AT = Path(__file__).with_name("kill_at.py")


def run_cli(*args: str, timeout: float = 300, kill_at: Optional[str] = None,
            **env: str) -> subprocess.CompletedProcess:
    """`python -m piflow.cli ARGS` in a fresh process (one thread), output captured as text. With `kill_at`
    ("STAGE:FILE:N"), the CLI runs under kill_at.py, which SIGKILLs it at that point of a file write."""
    launcher = [str(KILL_AT), kill_at] if kill_at is not None else ["-m", "piflow.cli"]
    return subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**env))


class InProcess:
    """`piflow.cli.main(ARGS)` in this process (fast: no interpreter start-up), with the result shaped like a
    `subprocess.CompletedProcess` (returncode, stdout, stderr) for `assert_one_line_error`."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        import torch

        from piflow.cli import main

        threads = torch.get_num_threads()
        torch.set_num_threads(1)                       # the numbers of a one-thread subprocess run
        self.capsys.readouterr()
        try:
            code = main(list(args))
        finally:
            torch.set_num_threads(threads)
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)


@pytest.fixture
def cli(capsys) -> InProcess:
    return InProcess(capsys)


def strict_json_load(path: Path):
    """json.load that refuses the non-standard NaN/Infinity tokens."""
    def refuse(token):
        raise ValueError(f"{path}: non-standard JSON token {token}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


class _RunsShell:
    """Unpickling this creates `marker` (as an attacker's payload would run any command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_pickle(marker: Path, torch_format: bool = False) -> bytes:
    """Bytes that run `touch marker` when unpickled: a raw pickle, or torch.save's zip format holding one."""
    payload = {"step": 1, "model": _RunsShell(marker)}
    if not torch_format:
        return pickle.dumps(payload)
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *fragments: str, code: int = 2,
                          only_line: bool = True) -> str:
    """The command failed with `code` and printed one stderr line naming the command and `fragments` (and nothing
    else, unless `only_line` is False: third-party libraries such as diffusers print their own progress first)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if only_line:
        assert len(lines) == 1, result.stderr[-2000:]
    lines = lines[-1:]
    assert lines[0].startswith(f"piflow {command}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished TINY_2D distillation run (shared read-only by the tests; copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("distill", "--run-dir", str(run_dir), *TINY_2D)
    assert result.returncode == 0, result.stderr
    return run_dir
