"""Progress with an ETA for the long headless commands (demo, bench, fit-priors), on stderr so that what they print on
stdout stays parseable: a bar redrawn in place on a terminal; elsewhere (a pipe, a log) a plain line at the start,
then at most one every `every` seconds and one at the end, so that a log shows the command is alive without filling."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 28
EVERY_S = 10.0


class Progress:
    """`advance(amount, note)` moves the bar; the ETA assumes the remaining work goes at the pace so far."""

    def __init__(self, total: float, label: str, stream: TextIO | None = None, enabled: bool = True,
                 every: float = EVERY_S) -> None:
        self.total, self.label, self.done = max(float(total), 1e-9), label, 0.0
        self.stream = stream or sys.stderr
        self.enabled, self.every = enabled, every
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.shown: float | None = None  # when the last plain line was written
        self.note = ""
        self.show()

    def advance(self, amount: float = 1.0, note: str | None = None) -> None:
        self.done = min(self.done + amount, self.total)
        if note is not None:
            self.note = note
        self.show()

    def show(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            now = time.monotonic()
            if self.shown is not None and now - self.shown < self.every and self.done < self.total:
                return
            self.shown = now
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def line(self) -> str:
        share = self.done / self.total
        filled = round(share * WIDTH)
        elapsed = time.monotonic() - self.started
        eta = elapsed * (1 - share) / share if share > 0 else float("nan")
        note = f"  {self.note}" if self.note else ""
        return (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {share:4.0%}  {clock(elapsed)} elapsed, "
                f"ETA {clock(eta)}{note}")

    def finish(self, note: str = "done") -> None:
        """All the work is done, even where the total was an upper bound (a speed fit runs identical plans once)."""
        self.advance(self.total - self.done, note)

    def close(self) -> None:
        """Clear the bar from the terminal (the next output starts on a clean line); a log keeps its lines."""
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    minutes, s = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"
