"""The one progress line every long verb prints on stderr.

``score: 12,345/50,000 stamps (24.7%), 8,123 stamps/s`` — in place on a terminal, a new line every ~10 s
otherwise (a log file stays readable); off with the verb's ``--no-progress`` or ``STAMPRAY_PROGRESS=0``.
What is counted (``unit``: stamps, files, tasks, maps) and what the rate counts (``rate_unit``) may differ:
ingest counts files done and reports stamps per second.
"""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """A progress line for ``verb`` over ``total`` units (``done`` of them finished before this run)."""

    def __init__(self, verb: str, total: int, enabled: bool = True, unit: str = "stamps",
                 rate_unit: str | None = None, done: int = 0):
        self.verb, self.total, self.unit, self.rate_unit = verb, int(total), unit, rate_unit or unit
        self.enabled = bool(enabled) and os.environ.get("STAMPRAY_PROGRESS", "1") != "0"
        self.done, self.counted = int(done), 0  # units done; what the rate counts, this run
        self.tty = sys.stderr.isatty()
        self.t0, self.last = time.time(), 0.0
        self.shown = -1  # the count the last line showed

    def update(self, units: int = 1, counted: int | None = None) -> None:
        """``units`` more done (``counted`` more of what the rate counts; default: the units)."""
        self.done += int(units)
        self.counted += int(units if counted is None else counted)
        self.show()

    def show(self, force: bool = False) -> None:
        now = time.time()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 10.0)):
            return
        rate = self.counted / max(now - self.t0, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        self.say(f"{self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%), {rate:,.0f} {self.rate_unit}/s")
        self.shown = self.done

    def say(self, text: str) -> None:
        """One line of the verb's own (a stage, a wait), in the progress line's place."""
        if not self.enabled:
            return
        line = f"{self.verb}: {text}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.last = time.time()

    def close(self) -> None:
        """The final count, where a line was shown, and the end of an in-place line."""
        if self.enabled and self.last:
            if self.counted and self.done != self.shown:  # the final count, unless the last line was it
                self.show(force=True)
            if self.tty:
                print(file=sys.stderr)
            self.last = 0.0
