"""The backtest's engine on the train part: it walks the bars one at a time, publishes each
position the bar it closes, and at every decision bar asks negcase for a signal, falling back
to the control rule while there is no checkpoint (or no answer), as a live engine would."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from negcase.sim.bars import Bars
from negcase.sim.features import FeatureTable
from negcase.sim.pipeline import Pipeline
from negcase.sim.trading import (
    Terms,
    closed_trade,
    control_side,
    exit_bar,
    pnl_pct,
    side_pnl_pct,
    trade_id,
)

QUARTERS = 4


@dataclass(frozen=True, slots=True)
class Plan:
    """Which bars decide: `first` is the first bar with features, bars before `train_end`
    are the train part (published), the rest are held out (never published)."""

    first: int
    train_end: int
    train: tuple[int, ...]
    held_out: tuple[int, ...]


class PlanError(ValueError):
    """Bars and options that leave a part of the backtest without a decision."""


def make_plan(bar_count: int, first: int, train_share: float, every: int, terms: Terms) -> Plan:
    """Decision bars every `every` bars from `first`, each part's positions closed within it."""
    train_end = round(bar_count * train_share)
    train = tuple(t for t in range(first, train_end, every) if exit_bar(t, terms) < train_end)
    held_out = tuple(
        t for t in range(train_end, bar_count, every) if exit_bar(t, terms) < bar_count
    )
    if not train or not held_out:
        part = "train" if not train else "held-out"
        raise PlanError(
            f"the {part} part has no decision: {bar_count} bars, features from bar {first}, "
            f"train share {train_share}, a decision every {every} bars held {terms.hold}"
        )
    return Plan(first, train_end, train, held_out)


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the train part: the side taken and who chose it, its result, and what
    the control rule would have done on the same bar."""

    bar: int
    side: str
    by: str  # "model" or "control"
    version: int | None
    pnl_pct: float | None
    control_side: str
    control_pnl_pct: float | None


Progress = Callable[[int, int, int | None], None]


@dataclass
class TrainWalk:
    """The engine of the train part."""

    bars: Bars
    features: FeatureTable
    plan: Plan
    terms: Terms
    symbol: str
    pipeline: Pipeline
    progress: Progress
    # every trade and skip published, in order: what `--trades-out` writes
    published: list[dict[str, Any]] = field(default_factory=list)

    def run(self) -> list[Decision]:
        """Walk the train part; every decision, in bar order."""
        decisions: list[Decision] = []
        deciding = set(self.plan.train)
        open_positions: deque[tuple[int, dict[str, Any]]] = deque()
        trades = 0
        version: int | None = None
        for t in range(self.plan.first, self.plan.train_end):
            # positions that closed at the end of the bar before: published one at a time
            while open_positions and open_positions[0][0] < t:
                self._publish(open_positions.popleft()[1])
            if t in deciding:
                decision, trade = self._decide(t)
                decisions.append(decision)
                version = decision.version or version
                open_positions.append((exit_bar(t, self.terms), trade))
                trades += 1
            self.progress(t + 1 - self.plan.first, trades, version)
        for _, trade in open_positions:
            self._publish(trade)
        return decisions

    def _publish(self, trade: dict[str, Any]) -> None:
        self.pipeline.publish(trade)
        self.published.append(trade)

    def _decide(self, t: int) -> tuple[Decision, dict[str, Any]]:
        features = self.features.rows[t].tolist()
        control = control_side(self.bars, t)
        signal = self.pipeline.ask(features, trade_id(self.symbol, t))
        # No checkpoint, no answer, or no opinion: the engine keeps its own rule.
        if signal is None or not signal.opinion:
            side, by = control, "control"
        else:
            side, by = signal.action, "model"
        control_pnl = side_pnl_pct(self.bars, t, control, self.terms, self.symbol)
        # A skip is reported too (side HOLD, the market's move over the hold), so that a
        # missed move can be learnt from.
        trade = closed_trade(self.bars, t, side, self.terms, self.symbol)
        trade["features"] = features
        # What the rule would have done, whoever decided: the serving step judges the
        # version in service against it.
        trade["rule_side"] = control
        trade["decided_by"] = by  # not a TradeClosed field: kept with the case under extra
        if signal is not None:
            # The version whose reply the engine had, opinion or not: its live window scores
            # the policy an engine runs with it (its action where it has an opinion, the
            # rule's elsewhere).
            trade["model_version"] = signal.model_version
        version = None
        if by == "model":
            version = signal.model_version
            trade["confidence"] = signal.confidence
        result = None if side == "HOLD" else pnl_pct(trade, self.features.count)
        return Decision(t, side, by, version, result, control, control_pnl), trade


def train_quarters(decisions: list[Decision], bars: Bars) -> list[dict[str, Any]]:
    """The live loss rate of the model's trades in each quarter of the train part's
    decisions, beside the control rule's on the same bars, and how often the control rule
    decided because there was no model yet."""
    size = math.ceil(len(decisions) / QUARTERS)
    quarters = []
    for start in range(0, len(decisions), size):
        chunk = decisions[start : start + size]
        by_model = [d for d in chunk if d.by == "model"]
        model_trades = [d.pnl_pct for d in by_model if d.pnl_pct is not None]
        control_trades = [d.control_pnl_pct for d in by_model if d.control_pnl_pct is not None]
        quarters.append(
            {
                "from": bars.label(chunk[0].bar),
                "to": bars.label(chunk[-1].bar),
                "decisions": len(chunk),
                "by_control": len(chunk) - len(by_model),
                "model_trades": len(model_trades),
                "model_loss_rate": _loss_rate(model_trades),
                "control_trades": len(control_trades),
                "control_loss_rate": _loss_rate(control_trades),
            }
        )
    return quarters


def _loss_rate(results: list[float]) -> float | None:
    return round(sum(r < 0 for r in results) / len(results), 6) if results else None
