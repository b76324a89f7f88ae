"""Bars: OHLCV rows read from a CSV or gzipped CSV file, for `negcase backtest`.

The header row names a date/time column (`date`, `datetime`, `time` or `timestamp`) and
`open`, `high`, `low`, `close` and `volume`, matched case-insensitively; other columns (an
`Adj Close`, say) are ignored. A date is ISO 8601 (`2019-01-31`, `2019-01-31 15:30`, with or
without an offset; naive times are UTC), US month/day/year (`1/31/2019`, as Yahoo Finance and
FRED exports write it), or a Unix time in seconds or milliseconds, from 1970-01-01 on (the
trades a backtest publishes carry Unix times in milliseconds, which cannot be negative). Rows
must be in strictly increasing time order. Every error names the file, the line, the column
and the reason.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from negcase.schemas.trade import MAX_TIMESTAMP_MS

TIME_COLUMNS = ("date", "datetime", "time", "timestamp")
VALUE_COLUMNS = ("open", "high", "low", "close", "volume")
GZIP_MAGIC = b"\x1f\x8b"
# A Unix time above this is in milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
_MS_FROM = 1e11
_US_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?")
_NUMBER = re.compile(r"\d+(?:\.\d*)?")


class BarsError(ValueError):
    """A bars file that cannot be used: which file, line and column, and why."""

    def __init__(
        self, path: Path, reason: str, line: int | None = None, column: str | None = None
    ) -> None:
        where = f", line {line}" if line is not None else ""
        where += f", column {column!r}" if column is not None else ""
        super().__init__(f"{path}{where}: {reason}")
        self.path, self.line, self.column, self.reason = path, line, column, reason


@dataclass(frozen=True, slots=True)
class Bars:
    """Bars in time order: opening times (ms since the epoch, UTC) and float64 prices."""

    times_ms: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:
        return len(self.times_ms)

    def until(self, end: int) -> Bars:
        """The bars before bar `end` (views, no copies): all that is known when it opens."""
        return Bars(*(getattr(self, name)[:end] for name in _FIELDS))

    def between(self, start: int, end: int) -> Bars:
        """Bars `start` to `end` - 1, as a slice of a longer file would hold them."""
        return Bars(*(getattr(self, name)[start:end] for name in _FIELDS))

    def label(self, index: int) -> str:
        """Bar `index`'s time for people: the date, with the time of day for intraday bars."""
        moment = datetime.fromtimestamp(int(self.times_ms[index]) / 1000, UTC)
        daily = not (self.times_ms % 86_400_000).any()
        return moment.strftime("%Y-%m-%d" if daily else "%Y-%m-%d %H:%M")


_FIELDS = ("times_ms", "open", "high", "low", "close", "volume")


def read_bars(path: Path) -> Bars:
    """Read a CSV or gzipped CSV of bars; BarsError names what cannot be used."""
    path = Path(path)
    rows = csv.reader(io.StringIO(_text_of(path)))
    header = next(rows, None)
    if header is None:
        raise BarsError(path, "the file is empty")
    columns = _columns(path, header)
    names = [header[position].strip() for position in columns]
    times: list[int] = []
    values: list[list[float]] = [[] for _ in VALUE_COLUMNS]
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = _cells(path, line, row, columns, names)
        times.append(_time_ms(path, line, names[0], cells[0]))
        for k, text in enumerate(cells[1:]):
            values[k].append(_value(path, line, names[k + 1], text))
        _check_row(path, line, names, times, values)
    if not times:
        raise BarsError(path, "no bars after the header")
    return Bars(np.array(times, np.int64), *(np.array(v, np.float64) for v in values))


def _text_of(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise BarsError(path, f"cannot be read ({error.strerror or error})") from None
    if raw.startswith(GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise BarsError(path, f"not a readable gzip file ({error})") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write, is skipped
    except UnicodeDecodeError as error:
        raise BarsError(path, f"not UTF-8 text (byte {error.start})") from None


def _columns(path: Path, header: list[str]) -> list[int]:
    """Positions of the time column, then open, high, low, close, volume."""
    names = [name.strip().lower() for name in header]
    times = [i for i, name in enumerate(names) if name in TIME_COLUMNS]
    if not times:
        wanted = " or ".join(repr(name) for name in TIME_COLUMNS)
        raise BarsError(path, f"no date/time column in the header {header}: name one {wanted}", 1)
    found = [times[0]]
    for name in VALUE_COLUMNS:
        if name not in names:
            raise BarsError(path, f"the header {header} has no {name!r} column", 1, name)
        found.append(names.index(name))
    return found


def _cells(
    path: Path, line: int, row: list[str], columns: list[int], names: list[str]
) -> list[str]:
    """The row's time, open, high, low, close and volume cells, as text."""
    for position, name in zip(columns, names, strict=True):
        if position >= len(row):
            raise BarsError(path, f"the row has {len(row)} cells, too few to reach it", line, name)
    return [row[position].strip() for position in columns]


def _value(path: Path, line: int, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BarsError(path, f"{text!r} is not a number", line, name) from None
    if not math.isfinite(value):
        raise BarsError(path, f"{text!r} is not a finite number", line, name)
    if name.lower() == "volume":
        if value < 0:
            raise BarsError(path, f"{text} is negative", line, name)
    elif value <= 0:
        raise BarsError(path, f"{text} is not a positive price", line, name)
    return value


def _time_ms(path: Path, line: int, column: str, text: str) -> int:
    milliseconds = _parsed_ms(path, line, column, text)
    if milliseconds < 0:
        reason = (
            f"{text!r} is before 1970-01-01 00:00 UTC: a trade's times are Unix milliseconds, "
            "which cannot be negative; start the file at 1970 or later"
        )
        raise BarsError(path, reason, line, column)
    if milliseconds > MAX_TIMESTAMP_MS:
        reason = (
            f"{text!r} is after 9999-12-31 (UTC): a Unix time in microseconds or nanoseconds? "
            "Use seconds or milliseconds"
        )
        raise BarsError(path, reason, line, column)
    return int(milliseconds)


def _parsed_ms(path: Path, line: int, column: str, text: str) -> float:
    """The time `text` names, in Unix milliseconds (a float: a number of 400 digits is
    infinity here, and is refused by its range, not by an overflow)."""
    if _NUMBER.fullmatch(text):
        number = float(text)
        return number if number >= _MS_FROM else number * 1000
    if match := _US_DATE.fullmatch(text):
        month, day, year, hour, minute, second = (int(g) if g else 0 for g in match.groups())
        try:
            moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        except ValueError as error:
            raise BarsError(path, f"{text!r}: {error}", line, column) from None
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            reason = (
                f"{text!r} is not a date: use ISO 8601 (2019-01-31), month/day/year "
                "(1/31/2019) or a Unix time in seconds or milliseconds"
            )
            raise BarsError(path, reason, line, column) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() * 1000


def _check_row(
    path: Path, line: int, names: list[str], times: list[int], values: list[list[float]]
) -> None:
    high, low = values[1][-1], values[2][-1]
    if high < low:
        raise BarsError(path, f"{high} is below the low, {low}", line, names[2])
    if len(times) > 1 and times[-1] <= times[-2]:
        reason = "not after the row before it: bars must be in strictly increasing time order"
        raise BarsError(path, reason, line, names[0])
