"""A synthetic trading engine on a simulated market, for the demo, tests and benchmarks.

The market has a hidden rule a model can learn: the features a trade opens on predict the
direction of the next move (a linear rule plus noise, which drifts between regimes). The
engine picks a side (at random, or by asking a model), and publishes the closed trade the
way a real engine would, model_version included.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from negcase.schemas.case import NegativeCase

SYMBOLS = {"BTC/USDT": 65_000.0, "ETH/USDT": 3_000.0, "SOL/USDT": 150.0, "BNB/USDT": 600.0}
LEVERAGES = (1.0, 2.0, 3.0, 5.0, 10.0)
FEE_RATE = 0.0004


@dataclass(slots=True)
class Situation:
    """What the market looks like when a trade opens, and how far it will move."""

    symbol: str
    price: float
    features: list[float]
    regime: int
    move_pct: float


@dataclass
class Market:
    """Prices that move by a hidden rule of the features. The rule (from `seed`) drifts
    every `regime_length` situations; the situations themselves come from `stream_seed`, so
    two markets with one seed and different streams follow the same rules."""

    feature_count: int = 8
    seed: int = 0
    stream_seed: int | None = None
    regime_length: int = 1_500
    regimes: int = 3
    move_scale_pct: float = 1.5
    noise: float = 0.35
    rng: np.random.Generator = field(init=False)
    _rules: list[np.ndarray] = field(init=False)
    _opened: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(
            self.seed if self.stream_seed is None else self.stream_seed
        )
        rule_rng = np.random.default_rng(self.seed + 1)
        base = rule_rng.normal(size=self.feature_count)
        # Each regime nudges the rule: a model must keep learning, but what it learnt helps.
        self._rules = []
        for _ in range(self.regimes):
            rule = base + 0.5 * rule_rng.normal(size=self.feature_count)
            self._rules.append(rule / np.linalg.norm(rule))

    def situation(self, regime: int | None = None) -> Situation:
        """A new situation to open a trade on (in the current regime unless one is given)."""
        if regime is None:
            regime = (self._opened // self.regime_length) % self.regimes
        self._opened += 1
        rng = self.rng
        symbol = list(SYMBOLS)[int(rng.integers(len(SYMBOLS)))]
        price = SYMBOLS[symbol] * float(math.exp(rng.normal(0, 0.02)))
        features = rng.normal(size=self.feature_count).round(4)
        signal = float(np.dot(self._rules[regime], features))
        direction = math.tanh(2 * signal) + rng.normal(0, self.noise)
        move_pct = direction * self.move_scale_pct * abs(rng.normal(0.6, 0.3))
        return Situation(symbol, price, features.tolist(), regime, move_pct)


def pnl_pct(side: str, move_pct: float, leverage: float = 1.0, fee_rate: float = FEE_RATE) -> float:
    """Result of a trade on the margin at risk, in percent (the detector's formula)."""
    move = move_pct / 100 if side == "BUY" else -move_pct / 100
    return (move - fee_rate) * leverage * 100


MALFORMED: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = (
    lambda t: {k: v for k, v in t.items() if k != "symbol"},
    lambda t: {**t, "entry_price": -abs(t["entry_price"])},
    lambda t: {**t, "exit_price": "NaN"},
    lambda t: {**t, "side": "HODL"},
    lambda t: {**t, "features": t["features"][:3]},
    lambda t: {**t, "leverage": 0.5},
)


@dataclass
class SyntheticEngine:
    """Opens trades on the market, closes them, and writes trade-close events."""

    market: Market
    malformed_share: float = 0.03
    prefix: str = "demo"
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def closed_trade(
        self, situation: Situation, side: str, model_version: int | None = None
    ) -> dict[str, Any]:
        """The trade-close event of a position opened on `situation` (some malformed)."""
        rng = self.market.rng
        entry = round(situation.price, 4)
        exit_ = round(situation.price * (1 + situation.move_pct / 100), 4)
        trade: dict[str, Any] = {
            "trade_id": f"{self.prefix}-{next(self._ids)}",
            "symbol": situation.symbol,
            "side": side,
            "entry_price": entry,
            "exit_price": exit_,
            "quantity": round(float(rng.uniform(0.1, 2.0)), 3),
            "leverage": LEVERAGES[int(rng.integers(len(LEVERAGES)))],
            "fee_rate": FEE_RATE,
            "features": situation.features,
            "market_state_before": {"price": entry, "regime": situation.regime},
            "market_state_after": {"price": exit_},
        }
        if model_version is not None:
            trade["model_version"] = model_version
        if rng.random() < self.malformed_share:
            trade = MALFORMED[int(rng.integers(len(MALFORMED)))](trade)
        return trade

    def random_trades(self) -> Iterator[dict[str, Any]]:
        """An endless series of trades on coin-flip sides, with no model version."""
        rng = self.market.rng
        while True:
            side = "BUY" if rng.random() < 0.5 else "SELL"
            yield self.closed_trade(self.market.situation(), side)


def random_trades(
    seed: int, prefix: str = "demo", malformed_share: float = 0.03
) -> Iterator[dict[str, Any]]:
    """Trades on coin-flip sides from a fresh market with this seed."""
    engine = SyntheticEngine(Market(seed=seed), malformed_share, prefix)
    return engine.random_trades()


def held_out_situations(market_seed: int, feature_count: int, per_regime: int) -> list[Situation]:
    """A fixed stream of situations under the market's own rules, `per_regime` of each
    regime, never traded in the demo: the same for every model judged on it."""
    market = Market(feature_count=feature_count, seed=market_seed, stream_seed=market_seed + 10_007)
    return [market.situation(regime) for regime in range(market.regimes) for _ in range(per_regime)]


def synthetic_case(
    case_id: str,
    trade_id: str,
    features: list[float] | None,
    label: str,
    priority: int,
    epochs: int,
    loss_pct: float,
    created_at_ms: int,
    lesson: str,
) -> NegativeCase:
    """A case made without a trade (for tests and benchmarks): a BUY of one unit at 100 that
    lost `loss_pct`, without leverage or fees, that should have been `label`."""
    return NegativeCase(
        case_id=case_id,
        trade_id=trade_id,
        symbol="ETH/USDT",
        side="BUY",
        entry_price=100.0,
        exit_price=100.0 - loss_pct,
        quantity=1.0,
        leverage=1.0,
        fee_rate=0.0,
        move_pct=-loss_pct,
        pnl_pct=-loss_pct,
        loss_percentage=loss_pct,
        loss_amount=loss_pct,
        what_should_have_been_done=label,
        lesson_learned=lesson,
        training_priority=priority,
        training_epochs=epochs,
        created_at_ms=created_at_ms,
        features=features,
    )
