"""Live scores: per model version, a window of its most recent outcomes in Redis, the list
`<ns>:live:<version>`, newest first, one value a decision: its P&L in percent of the margin,
or `hold` for a decision not to trade (it made 0). The serving step judges versions on them
(store/serving_step.lua); `negcase status`, the dashboard and the gauges show them.

Each trade enters a window once: `<ns>:live:seen` remembers the trade ids scored (the last
SEEN_MAX_IDS of them), so a redelivered entry, two detectors on one entry, or a trade
published twice is scored once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from negcase.store.keys import Keys
from negcase.store.scripts import script

HOLD = "hold"
SEEN_MAX_IDS = 100_000


@dataclass(frozen=True, slots=True)
class LiveOutcome:
    """One decision made by a model version, for its live window: the P&L of the trade in
    percent of the margin, or None for a decision not to trade."""

    trade_id: str
    version: int
    pnl_pct: float | None
    # What the engine's own rule would have made on the same decision (0 for its HOLD), when
    # the engine said (TradeClosed.rule_side): the serving step compares the two.
    rule_pnl_pct: float | None = None

    @property
    def value(self) -> str:
        """The window's text for it: the P&L, or `hold`."""
        return HOLD if self.pnl_pct is None else repr(round(self.pnl_pct, 6))

    @property
    def rule_value(self) -> str:
        """The rule's P&L as score_live.lua takes it ('' when unknown)."""
        return "" if self.rule_pnl_pct is None else repr(round(self.rule_pnl_pct, 6))


@dataclass(frozen=True, slots=True)
class LiveStats:
    """A window's figures: outcomes, trades and losses among them, mean P&L per decision
    (a hold counts as 0, in percent of the margin) and its sample variance."""

    n: int
    trades: int
    losses: int
    mean_pnl_pct: float
    variance: float

    @property
    def loss_rate(self) -> float:
        """Losses per trade (0 without trades)."""
        return self.losses / self.trades if self.trades else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """Plain data for JSON and the dashboard."""
        return {
            "outcomes": self.n,
            "trades": self.trades,
            "losses": self.losses,
            "loss_rate": round(self.loss_rate, 4),
            "mean_pnl_pct": round(self.mean_pnl_pct, 4),
            "stdev_pct": round(math.sqrt(self.variance), 4),
        }


def window_stats(values: Iterable[bytes | str]) -> LiveStats:
    """The figures of a window's values, as live_stats.lua computes them (a value that is
    neither a number nor `hold` is left out)."""
    pnls: list[float] = []
    trades = losses = 0
    for raw in values:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if text == HOLD:
            pnls.append(0.0)
            continue
        try:
            pnl = float(text)
        except ValueError:
            continue
        trades += 1
        losses += pnl < 0
        pnls.append(pnl)
    n = len(pnls)
    mean = math.fsum(pnls) / n if n else 0.0
    variance = statistics.variance(pnls, mean) if n > 1 else 0.0
    return LiveStats(n, trades, losses, mean, variance)


def z_score(a: LiveStats, b: LiveStats) -> float:
    """How many standard errors a's mean P&L per decision lies above b's (Welch), as
    live_stats.lua computes it: negative when a did worse."""
    difference = a.mean_pnl_pct - b.mean_pnl_pct
    error = math.sqrt(a.variance / a.n + b.variance / b.n) if a.n and b.n else 0.0
    if error > 0:
        return difference / error
    return math.copysign(math.inf, difference) if difference else 0.0


class LiveScores:
    """Writes outcomes into the windows and reads the windows back."""

    def __init__(self, client: redis.Redis, keys: Keys, window: int) -> None:
        self.client = client
        self.keys = keys
        self.window = window
        self._score = script(client, "score_live", "clock")

    def record(self, outcomes: Sequence[LiveOutcome]) -> tuple[int, int]:
        """Add each outcome to its version's window unless its trade was scored before.
        Returns (scored, duplicates)."""
        if not outcomes:
            return 0, 0
        versions = list(dict.fromkeys(outcome.version for outcome in outcomes))
        position = {version: at for at, version in enumerate(versions, start=1)}
        args: list[str | int] = [self.window, SEEN_MAX_IDS, len(versions), *versions]
        for outcome in outcomes:
            args += [outcome.trade_id, position[outcome.version], outcome.value, outcome.rule_value]
        keys = self.keys
        scored, duplicates = self._score(
            keys=[keys.live_seen, keys.stats, keys.live_versions, *map(keys.live, versions)],
            args=args,
        )
        return int(scored), int(duplicates)

    def versions(self) -> list[int]:
        """The versions with a window, newest first."""
        return [int(v) for v in self.client.zrevrange(self.keys.live_versions, 0, -1)]

    def stats(self, versions: Sequence[int]) -> dict[int, LiveStats]:
        """The figures of each version's window, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for version in versions:
            pipe.lrange(self.keys.live(version), 0, -1)
        windows = pipe.execute()
        return {v: window_stats(values) for v, values in zip(versions, windows, strict=True)}
