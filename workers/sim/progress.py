"""The backtest's progress on stderr: one line redrawn in place on a terminal, a plain line
every tenth of the way otherwise (logs, CI), so stdout keeps only the table or the JSON."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

REDRAW_EVERY_S = 0.2
PLAIN_STEPS = 10


@dataclass
class ProgressLine:
    """Bars done, trades, the checkpoint in use, elapsed and estimated time left."""

    total_bars: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    redraw: bool | None = None
    _started_s: float = field(default_factory=time.monotonic)
    _drawn_s: float = 0.0
    _step: int = 0

    def __post_init__(self) -> None:
        if self.redraw is None:
            self.redraw = self.stream.isatty()

    def say(self, text: str) -> None:
        """A line of its own (a phase starting)."""
        self._write(f"backtest: {text}\n")

    def start(self) -> None:
        """Start the clock for the time-left estimate."""
        self._started_s = time.monotonic()

    def __call__(self, bars_done: int, trades: int, version: int | None) -> None:
        """Report the walk's position."""
        now_s = time.monotonic()
        if self.redraw:
            if now_s - self._drawn_s < REDRAW_EVERY_S and bars_done < self.total_bars:
                return
            self._drawn_s = now_s
            self._write(f"\r\x1b[K{self._text(bars_done, trades, version, now_s)}")
            if bars_done >= self.total_bars:
                self._write("\n")
            return
        step = bars_done * PLAIN_STEPS // max(1, self.total_bars)
        if step > self._step:
            self._step = step
            self._write(f"backtest: {self._text(bars_done, trades, version, now_s)}\n")

    def _text(self, bars_done: int, trades: int, version: int | None, now_s: float) -> str:
        elapsed_s = now_s - self._started_s
        left_s = elapsed_s / bars_done * (self.total_bars - bars_done) if bars_done else 0.0
        checkpoint = "none yet" if version is None else f"v{version}"
        return (
            f"train bars {bars_done}/{self.total_bars} ({bars_done / self.total_bars:.0%}), "
            f"{trades} trades, checkpoint {checkpoint}, {clock(elapsed_s)} elapsed, "
            f"~{clock(left_s)} left"
        )

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def clock(seconds: float) -> str:
    """Seconds as m:ss."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"
