"""Progress of long work (shard conversion, inference, class embeddings): a tqdm bar on a terminal,
and a plain line every ``every_s`` seconds otherwise. A log file, ``ray job logs`` or CI would
otherwise get tqdm's carriage-return redraws, one endless line.

Both have tqdm's small interface that the callers use: ``update(n)``, ``set_postfix_str(text)``,
``close()``, and the context manager.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Lines:
    """The non-terminal form: ``desc: done/total unit (rate unit/s, postfix)`` every ``every_s`` seconds,
    and once more at the end of work that printed any (short work stays silent)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream: TextIO, every_s: float):
        self.total, self.desc, self.unit, self.stream, self.every_s = total, desc, unit, stream, every_s
        self.n, self.start_n, self.postfix, self.shown = initial, initial, "", -1  # shown: n at the last line
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if 0 <= self.shown != self.n:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        self.shown = self.n
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}s ({rate:.2f} {self.unit}s/s{extra})", file=self.stream, flush=True)

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "item", initial: int = 0, stream: TextIO | None = None,
             every_s: float = 10.0) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`Lines`."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total or None, initial=initial, desc=desc, unit=unit, file=stream, smoothing=0.1)
    return Lines(total, desc, unit, initial, stream, every_s)
