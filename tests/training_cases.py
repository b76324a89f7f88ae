"""Training data for tests, with labels from a hidden rule a model can learn: negative cases
built directly and stored through the detector's own batch write, or trade-close events
that go through a real detector and become outcomes (wins, losses, skips) and cases."""

from __future__ import annotations

import random

import redis

from negcase.client.trades import publish_trades
from negcase.processes.detector import LossDetector
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.case import ACTIONS, NegativeCase
from negcase.sim.engine import synthetic_case
from negcase.store.cases import CaseStore
from negcase.store.queue import queue_counts


def hidden_rule(features: list[float]) -> str:
    """The rule behind the synthetic labels: the sign of x0 + x1, HOLD near zero."""
    signal = features[0] + features[1]
    if signal > 0.5:
        return "BUY"
    if signal < -0.5:
        return "SELL"
    return "HOLD"


def random_features(rng: random.Random, count: int = 8) -> list[float]:
    """Features drawn from a standard normal."""
    return [rng.gauss(0.0, 1.0) for _ in range(count)]


def make_case(
    n: int,
    features: list[float] | None,
    action: str | None = None,
    priority: int = 3,
    loss_pct: float = 3.0,
    epochs: int = 40,
    created_at_ms: int = 1_700_000_000_000,
) -> NegativeCase:
    """A case numbered `n`, labelled `action` (the hidden rule's when not given)."""
    action = action or (hidden_rule(features) if features else "HOLD")
    assert action in ACTIONS
    return synthetic_case(
        f"nc-test-{n:05d}",
        f"t{n}",
        features,
        action,
        priority,
        epochs,
        loss_pct,
        created_at_ms + n,
        "test case",
    )


def rule_cases(count: int, seed: int = 1, start: int = 0, **kwargs: object) -> list[NegativeCase]:
    """`count` cases labelled by the hidden rule."""
    rng = random.Random(seed)
    return [make_case(start + n, random_features(rng), **kwargs) for n in range(count)]


RULE_MOVE = {"BUY": 0.02, "SELL": -0.02, "HOLD": 0.0002}


def rule_trades(count: int, seed: int = 1, prefix: str = "rt") -> list[dict[str, object]]:
    """Decisions on a market that moves by the hidden rule (2 % its way, or next to nothing
    where the rule says HOLD), taken on random sides: BUY, SELL, or a skip (side HOLD), so
    wins, losses, right skips and missed opportunities all occur."""
    rng = random.Random(seed)
    trades = []
    for n in range(count):
        features = random_features(rng)
        move = RULE_MOVE[hidden_rule(features)]
        trades.append(
            {
                "trade_id": f"{prefix}-{seed}-{n}",
                "symbol": "ETH/USDT",
                "side": rng.choice(ACTIONS),
                "entry_price": 100.0,
                "exit_price": round(100.0 * (1 + move), 6),
                "features": features,
            }
        )
    return trades


def detect(client: redis.Redis, settings: Settings, trades: list[dict[str, object]]) -> None:
    """Publish trades and let a real (in-process) loss detector drain them."""
    publish_trades(client, settings.keys, trades)
    LossDetector(client, settings, "test-detector", None).run(StopFlag(), burst=True)


def add_cases(client: redis.Redis, settings: Settings, cases: list[NegativeCase]) -> None:
    """Store and queue cases the way the loss detector does."""
    CaseStore(client, settings.keys).add(cases, "test")


def assert_conserved(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """queued + leased + done + dead == every case; returns the counts."""
    counts = queue_counts(client, settings.keys)
    parts = counts["queued"] + counts["leased"] + counts["done"] + counts["dead"]
    assert parts == counts["total"], counts
    return counts
