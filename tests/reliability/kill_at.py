"""Test-only launcher of the CLI with a kill point: ``python tests/reliability/kill_at.py STAGE:FILE:N ARGS...`` runs
``piflow.cli.main(ARGS)`` with a `piflow.files.write_hook` that SIGKILLs the process the N-th time (1-based) an
atomic write of a file named FILE reaches STAGE (``write-partial`` or ``write-before-rename``), e.g.
``write-partial:checkpoint.safetensors:2``. piflow itself knows nothing of this: the hook is installed here."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable

STAGES = ("write-partial", "write-before-rename")


def kill_hook(spec: str) -> Callable[[str, Path], None]:
    """A `piflow.files.write_hook` that SIGKILLs this process at the point `spec` ("STAGE:FILE:N") names."""
    stage, file_name, count = _parse(spec)
    seen = [0]

    def hook(at: str, path: Path) -> None:
        if at == stage and Path(path).name == file_name:
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _parse(spec: str) -> tuple[str, str, int]:
    stage, _, rest = spec.partition(":")
    file_name, _, count = rest.rpartition(":")
    if stage not in STAGES or not file_name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"kill point must be STAGE:FILE:N with STAGE in {STAGES} and N >= 1, got {spec!r}")
    return stage, file_name, int(count)


def main(argv: list[str]) -> int:
    """Install the kill hook named by argv[0] and run the CLI on the rest."""
    import piflow.files
    from piflow.cli import main as cli_main

    if not argv:
        raise SystemExit("usage: kill_at.py STAGE:FILE:N CLI-ARGS...")
    piflow.files.write_hook = kill_hook(argv[0])
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
