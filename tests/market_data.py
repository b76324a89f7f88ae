"""Real market bars for tests: slices of the daily S&P 500 file the `arch` package ships."""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

from arch.data import sp500


@cache
def _sp500_lines() -> tuple[str, ...]:
    path = Path(sp500.__file__).with_name("sp500.csv.gz")
    return tuple(gzip.decompress(path.read_bytes()).decode().splitlines())


def sp500_csv(bars: int, start: int = 0) -> str:
    """The header and `bars` daily S&P 500 bars from bar `start` (1999-01-04 is bar 0), as
    CSV text exactly as arch ships it (Date as month/day/year, an Adj Close column)."""
    lines = _sp500_lines()
    return "\n".join((lines[0], *lines[1 + start : 1 + start + bars])) + "\n"
