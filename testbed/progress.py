"""A progress bar with an ETA for the long headless commands (bench, fit-priors), drawn on a terminal only: piped or
logged output stays clean."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 28


class Progress:
    """`advance(amount, note)` moves the bar; the ETA assumes the remaining work goes at the pace so far."""

    def __init__(self, total: float, label: str, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.total, self.label, self.done = max(float(total), 1e-9), label, 0.0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self.note = ""

    def advance(self, amount: float = 1.0, note: str | None = None) -> None:
        self.done = min(self.done + amount, self.total)
        if note is not None:
            self.note = note
        if self.enabled:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def line(self) -> str:
        share = self.done / self.total
        filled = round(share * WIDTH)
        elapsed = time.monotonic() - self.started
        eta = elapsed * (1 - share) / share if share > 0 else float("nan")
        note = f"  {self.note}" if self.note else ""
        return (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {share:4.0%}  {clock(elapsed)} elapsed, "
                f"ETA {clock(eta)}{note}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    minutes, s = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"
