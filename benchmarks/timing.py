"""The one interleaved timing loop of the benchmarks that report ratios (imported by the scripts beside it)."""
from __future__ import annotations

import time
from typing import Callable


def interleaved_seconds(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Per side, the `repeats` times of one call, the sides timed in turn within each repeat (so that all see the
    same machine load); `warmup` untimed calls each first. `sync` waits for queued device work."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times
