"""`piflow.files.atomic_write`: the target holds the old bytes or the new ones at every stage, the test seam
(`write_hook`) is the only way in, and new files get the permissions the umask allows."""
from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import piflow.files
from piflow.files import atomic_write


class _Stop(Exception):
    """Raised by a test hook to stop a write at one stage."""


@pytest.fixture
def umask():
    """Set the process umask for one test (`umask(0o027)`), restored after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("stage", ["write-partial", "write-before-rename"])
def test_a_write_stopped_at_either_stage_leaves_the_old_file(tmp_path, monkeypatch, stage):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    new = bytes(range(256)) * 40
    seen: list[tuple[str, str, bytes]] = []

    def hook(at: str, path: Path) -> None:
        temporary, = tmp_path.glob(".state.bin.*.tmp")
        seen.append((at, path.name, temporary.read_bytes()))
        if at == stage:
            raise _Stop

    monkeypatch.setattr(piflow.files, "write_hook", hook)
    with pytest.raises(_Stop):
        atomic_write(target, new)
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(".*.tmp"))
    assert seen[0] == ("write-partial", "state.bin", new[:len(new) // 2])     # the first half, flushed
    if stage == "write-before-rename":
        assert seen[1] == ("write-before-rename", "state.bin", new)           # complete, not yet renamed
    monkeypatch.setattr(piflow.files, "write_hook", None)
    atomic_write(target, new)
    assert target.read_bytes() == new


def test_without_a_hook_the_bytes_go_out_in_one_write(tmp_path, monkeypatch):
    """Production writes are not split and read no environment variable."""
    calls = []

    class CountingFile(io.FileIO):
        def write(self, data) -> int:
            calls.append(len(data))
            return super().write(data)

    class NoEnvironment(dict):
        def get(self, key, default=None):
            raise AssertionError(f"atomic_write read ${key}")

        __getitem__ = get

    assert piflow.files.write_hook is None
    monkeypatch.setattr(piflow.files.os, "fdopen", lambda fd, mode: CountingFile(fd, mode))
    monkeypatch.setattr(piflow.files.os, "environ", NoEnvironment())
    atomic_write(tmp_path / "a.bin", b"x" * 1001)
    monkeypatch.undo()
    assert calls == [1001] and (tmp_path / "a.bin").read_bytes() == b"x" * 1001


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o000, 0o666)])
def test_new_files_get_the_permissions_the_umask_allows(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write(tmp_path / "new.json", b"{}")
    piflow.files.write_json(tmp_path / "other.json", {"a": 1})
    assert _mode(tmp_path / "new.json") == expected and _mode(tmp_path / "other.json") == expected


def test_a_replaced_file_keeps_its_permissions(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "kept.txt"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new" and _mode(target) == 0o640


def test_importing_piflow_files_leaves_the_umask_alone():
    """No import-time global change: `os.umask` is never called while piflow.files is imported."""
    code = ("import os\n"
            "def refuse(*args):\n"
            "    raise AssertionError('os.umask called at import')\n"
            "os.umask = refuse\n"
            "import piflow.files\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-2000:]


def test_the_temporary_file_name_is_what_the_stale_file_cleanup_removes(tmp_path, monkeypatch):
    names = []
    monkeypatch.setattr(piflow.files, "write_hook",
                        lambda at, path: names.extend(p.name for p in tmp_path.glob(".*.tmp")))
    atomic_write(tmp_path / "run.log", b"abc")
    assert len(names) == 2 and names[0] == names[1] and names[0].startswith(".run.log.")
    (tmp_path / names[0]).write_bytes(b"left by a killed writer")
    assert piflow.files.remove_stale_temporary_files(tmp_path) == [tmp_path / names[0]]
    assert (tmp_path / "run.log").read_bytes() == b"abc"
