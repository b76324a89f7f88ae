"""A synthetic trading engine on a simulated market, for the demo and the benchmarks.

The market has a hidden rule a model can learn: the features a trade opens on predict the
direction of the next move (a fixed linear rule plus noise, per regime). The engine picks a
side (at random, or from a model), and publishes the closed trade like a real engine would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SYMBOLS = {"BTC/USDT": 65_000.0, "ETH/USDT": 3_000.0, "SOL/USDT": 150.0, "BNB/USDT": 600.0}
LEVERAGES = (1.0, 2.0, 3.0, 5.0, 10.0)
FEE_RATE = 0.0004


@dataclass(slots=True)
class Situation:
    """What the market looks like when a trade opens."""

    symbol: str
    price: float
    features: list[float]
    regime: int


@dataclass
class Market:
    """Prices that move by a hidden rule of the features, which changes between regimes."""

    feature_count: int = 8
    seed: int = 0
    regime_length: int = 2_000
    move_scale_pct: float = 1.5
    noise: float = 0.35
    rng: np.random.Generator = field(init=False)
    _rules: list[np.ndarray] = field(init=False)
    _opened: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        rule_rng = np.random.default_rng(self.seed + 1)
        # Two regimes whose rules differ but overlap, so a model must keep learning.
        base = rule_rng.normal(size=self.feature_count)
        shifted = base.copy()
        shifted[: self.feature_count // 2] *= -1
        self._rules = [base / np.linalg.norm(base), shifted / np.linalg.norm(shifted)]

    @property
    def regime(self) -> int:
        """Which rule the market follows now."""
        return (self._opened // self.regime_length) % len(self._rules)

    def situation(self) -> Situation:
        """A new market situation to open a trade on."""
        symbol = list(SYMBOLS)[int(self.rng.integers(len(SYMBOLS)))]
        price = SYMBOLS[symbol] * float(math.exp(self.rng.normal(0, 0.02)))
        features = self.rng.normal(size=self.feature_count).round(4).tolist()
        situation = Situation(symbol, price, features, self.regime)
        self._opened += 1
        return situation

    def move_pct(self, situation: Situation) -> float:
        """How far the price moves while the trade is open, in percent."""
        signal = float(np.dot(self._rules[situation.regime], situation.features))
        direction = math.tanh(2 * signal) + self.rng.normal(0, self.noise)
        return direction * self.move_scale_pct * abs(self.rng.normal(0.6, 0.3))


Decide = Callable[[list[float]], tuple[str, int | None]]


def random_side(rng: np.random.Generator) -> Decide:
    """A decision rule that flips a coin, with no model version."""

    def decide(_features: list[float]) -> tuple[str, int | None]:
        return ("BUY" if rng.random() < 0.5 else "SELL"), None

    return decide


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
    """Opens trades on the market, closes them, and yields trade-close events."""

    market: Market
    decide: Decide
    malformed_share: float = 0.03
    hold_share: float = 0.0
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def trades(self, prefix: str = "demo") -> Iterator[dict[str, Any]]:
        """An endless series of trade-close events (some malformed on purpose)."""
        rng = self.market.rng
        while True:
            situation = self.market.situation()
            side, model_version = self.decide(situation.features)
            if side == "HOLD":
                continue
            move = self.market.move_pct(situation) / 100
            entry = round(situation.price, 4)
            exit_ = round(situation.price * (1 + move), 4)
            trade: dict[str, Any] = {
                "trade_id": f"{prefix}-{next(self._ids)}",
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
            yield trade
