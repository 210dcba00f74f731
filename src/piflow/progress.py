"""Progress reporting that reads well in a terminal and in a log file.

On a terminal `progress_bar` is a tqdm bar. Without one (output redirected to a file, a CI log, a cluster job's
stdout) a bar would write thousands of carriage-return updates into the log, so it prints a plain line instead at
every 10 % of the total and at the end (and at least every 5 minutes), e.g.
``distill: 400/800 (50%), 12.3 it/s, 33 s left, loss 0.0421``.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

LINE_FRACTION = 0.1
LINE_MAX_SECONDS = 300.0


class LineProgress:
    """A few plain lines instead of a bar (non-TTY output)."""

    def __init__(self, total: int, desc: str, initial: int = 0, file: Optional[TextIO] = None):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self._start_n, self._start = self.n, time.monotonic()
        self._last_time = self._start
        self._next_line = self._next_boundary(self.n)

    def _next_boundary(self, n: int) -> int:
        step = max(int(self.total * LINE_FRACTION), 1)
        return (n // step + 1) * step

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if self.n >= min(self._next_line, self.total) or now - self._last_time >= LINE_MAX_SECONDS:
            self._print(now)
            self._next_line = self._next_boundary(self.n)

    def _print(self, now: float) -> None:
        self._last_time = now
        done = self.n - self._start_n
        elapsed = max(now - self._start, 1e-9)
        rate = done / elapsed
        parts = [f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        if done > 0:
            parts.append(f"{rate:.3g} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it")
            left = (self.total - self.n) / rate
            parts.append(f"{left:.0f} s left" if self.n < self.total else f"{elapsed:.0f} s")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)

    def close(self) -> None:
        pass


class _Disabled:
    n = 0

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """tqdm on a terminal; the postfix is redrawn at tqdm's own pace, not on every call."""

    def __init__(self, total: int, desc: str, initial: int, file: TextIO):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=desc, file=file, dynamic_ncols=True)

    @property
    def n(self) -> int:
        return self._bar.n

    def update(self, count: int = 1) -> None:
        self._bar.update(count)

    def set_postfix_str(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self._bar.close()


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True, file: Optional[TextIO] = None):
    """A progress reporter with ``update(n)``, ``set_postfix_str(text)`` and ``close()``: a tqdm bar on a
    terminal, `LineProgress` otherwise, a no-op when not `enabled`."""
    if not enabled:
        return _Disabled()
    stream = file if file is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return _Bar(total, desc, initial, stream)
    return LineProgress(total, desc, initial, stream)
