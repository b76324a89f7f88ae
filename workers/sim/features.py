"""Features for the backtest: what the model sees when it decides at bar t, computed from the
bars before t only (never from bar t itself or later ones).

A feature function takes the bars that closed before the decision and returns the model's
input for it, or None while there is too little history. The backtest calls it with
`bars.until(t)`, so no function, built-in or a user's own (`--features module:function`),
can look ahead.

The built-in set, eight numbers on the scale of one standard deviation on any market.
With r = the log returns of the closes and s = the standard deviation of the last 20 of them:

  1. ret_1_z      r of the last bar / s
  2. ret_5_z      sum of the last 5 r / (s * sqrt 5)
  3. ret_20_z     sum of the last 20 r / (s * sqrt 20)
  4. ret_60_z     sum of the last 60 r / (s * sqrt 60)
  5. vol_20_pct   s in percent
  6. vol_ratio    the standard deviation of the last 5 r / s, minus 1
  7. range_z      the last bar's (high - low) / close, in units of s
  8. close_loc    where the last close sits in that bar's range: -1 at the low, +1 at the high

Volume is left out: some price series (WTI spot) have none.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from negcase.sim.bars import Bars

FeatureFunction = Callable[[Bars], Sequence[float] | None]
BUILTIN_NAMES = (
    "ret_1_z",
    "ret_5_z",
    "ret_20_z",
    "ret_60_z",
    "vol_20_pct",
    "vol_ratio",
    "range_z",
    "close_loc",
)
LONGEST_RETURN = 60
VOL_BARS = 20
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The built-in set needs 60 returns, so 61 closes: the first decision is at bar 61.
BUILTIN_WARMUP_BARS = LONGEST_RETURN + 1


class FeatureError(ValueError):
    """A feature function that cannot be used, or a value it returned, and why."""


def builtin_features(past: Bars) -> list[float] | None:
    """The built-in set (module docstring) for a decision right after `past`; None while
    fewer than BUILTIN_WARMUP_BARS bars have closed."""
    if len(past) < BUILTIN_WARMUP_BARS:
        return None
    returns = np.diff(np.log(past.close[-BUILTIN_WARMUP_BARS:]))
    sigma = float(returns[-VOL_BARS:].std())
    high, low, close = float(past.high[-1]), float(past.low[-1]), float(past.close[-1])
    bar_range = high - low
    return [
        _z(returns[-1:], sigma),
        _z(returns[-5:], sigma),
        _z(returns[-20:], sigma),
        _z(returns[-60:], sigma),
        sigma * 100,
        float(returns[-5:].std()) / sigma - 1 if sigma > 0 else 0.0,
        bar_range / close / sigma if sigma > 0 else 0.0,
        (2 * (close - low) / bar_range - 1) if bar_range > 0 else 0.0,
    ]


def _z(returns: np.ndarray, sigma: float) -> float:
    """A sum of returns in units of its standard deviation under volatility `sigma`."""
    if sigma <= 0:
        return 0.0
    return float(returns.sum()) / (sigma * math.sqrt(len(returns)))


def load_feature_function(path: str) -> FeatureFunction:
    """The function `package.module:function` names; FeatureError says why it cannot be used."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise FeatureError(f"--features {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FeatureError(f"--features {path!r}: cannot import {module_name} ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise FeatureError(f"--features {path!r}: {module_name} has no function {attribute}")
    return function


@dataclass(frozen=True, slots=True)
class FeatureTable:
    """The features of every bar a decision can be made at: row t is what the function
    returned for `bars.until(t)`; rows before `first` are NaN (too little history)."""

    rows: np.ndarray
    first: int

    @property
    def count(self) -> int:
        """Numbers per row: the model's input width."""
        return int(self.rows.shape[1])


def feature_table(bars: Bars, function: FeatureFunction) -> FeatureTable:
    """Call `function` for the decision at every bar, on the bars before it; FeatureError
    names the bar whose features are unusable."""
    rows: list[Sequence[float] | None] = [None]
    for t in range(1, len(bars)):
        rows.append(_checked(bars, t, function(bars.until(t)), rows[-1]))
    first = next((t for t, row in enumerate(rows) if row is not None), None)
    if first is None:
        raise FeatureError(f"no features for any of the {len(bars)} bars: too little history")
    width = len(rows[first])
    table = np.full((len(bars), width), np.nan)
    table[first:] = np.array(rows[first:], dtype=np.float64)
    return FeatureTable(table, first)


def _checked(
    bars: Bars, t: int, row: Sequence[float] | None, previous: Sequence[float] | None
) -> Sequence[float] | None:
    """Bar t's features as floats, checked against the bar before's (None: no features yet)."""
    where = f"features for bar {t} ({bars.label(t)})"
    if row is None:
        if previous is not None:
            raise FeatureError(f"{where}: None after earlier bars had features")
        return None
    try:
        values = [float(value) for value in row]
    except (TypeError, ValueError) as error:
        raise FeatureError(f"{where}: not a sequence of numbers ({error})") from None
    if not values:
        raise FeatureError(f"{where}: an empty list")
    if previous is not None and len(values) != len(previous):
        raise FeatureError(f"{where}: {len(values)} numbers, earlier bars had {len(previous)}")
    for index, value in enumerate(values):
        # The model reads float32: a finite float64 beyond its range would be infinity there.
        if not abs(value) <= FLOAT32_MAX:
            raise FeatureError(f"{where}: value {index} is {value}, not a finite float32 number")
    return values
