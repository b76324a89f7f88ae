"""Training data for tests, with labels from a hidden rule a model can learn: negative cases
built directly and stored through the detector's own batch write, or trade-close events
that go through a real detector and become outcomes (wins, losses, skips) and cases."""

from __future__ import annotations

import itertools
import random

import redis
import torch

from negcase.client.trades import publish_trades
from negcase.processes.detector import LossDetector
from negcase.processes.model import (
    build_model,
    sha256_hex,
    spec_from_settings,
    state_of,
    weights_bytes,
)
from negcase.runtime.settings import Settings
from negcase.schemas.case import ACTIONS, NegativeCase, case_id_for
from negcase.sim.engine import synthetic_case
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.keys import Keys
from negcase.store.leases import Lease
from negcase.store.queue import CaseQueue, is_held_out, queue_counts
from tests.conftest import run_burst, wait_until


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
    run_burst(LossDetector(client, settings, "test-detector", None))


def publish_constant_policy(client: redis.Redis, settings: Settings, action: str) -> int:
    """Publish a model that answers `action` whatever the features: every weight zero but
    the last bias, `action`'s by a hair. Training moves that bias alone (no gradient reaches
    the zeroed layers), so any model trained from it is a constant policy too. Its version."""
    spec = spec_from_settings(settings)
    model = build_model(spec)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        list(model.parameters())[-1][ACTIONS.index(action)] = 1e-3
    weights = weights_bytes(state_of(model))
    meta = {"feature_count": settings.feature_count, "model_spec": spec.to_dict(), "case_ids": []}
    registry = CheckpointRegistry(client, settings.keys)
    return registry.publish(weights, sha256_hex(weights), meta, registry.latest_version())


def held_out_trade(features: list[float], side: str, move: float) -> dict[str, object]:
    """A decision whose id the rule holds out: its outcome joins the validation window."""
    trade_id = next(
        f"judge-{n}" for n in itertools.count() if is_held_out(case_id_for(f"judge-{n}"), 0.1)
    )
    return {
        "trade_id": trade_id,
        "symbol": "ETH/USDT",
        "side": side,
        "entry_price": 100.0,
        "exit_price": round(100.0 * (1 + move), 6),
        "features": features,
    }


def add_cases(client: redis.Redis, settings: Settings, cases: list[NegativeCase]) -> None:
    """Store and queue cases the way the loss detector does."""
    CaseStore(client, settings.keys).add(cases, "test")


def assert_conserved(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """queued + leased + done + dead == every case; returns the counts."""
    counts = queue_counts(client, settings.keys)
    parts = counts["queued"] + counts["leased"] + counts["done"] + counts["dead"]
    assert parts == counts["total"], counts
    return counts


def redis_now_ms(client: redis.Redis) -> int:
    """Now by Redis's clock, which every lease script judges deadlines by."""
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def wait_for_lapse(client: redis.Redis, deadline_ms: float) -> None:
    """Wait until Redis's clock reaches a lease deadline: from then on the lease is lost."""
    wait_until(lambda: redis_now_ms(client) >= deadline_ms, 20, "the lease to lapse")


def claim_expired(client: redis.Redis, keys: Keys, worker: str) -> Lease:
    """Claim the best queued case on a 1 ms lease, and wait until that lease has lapsed."""
    [lease] = CaseQueue(client, keys, lease_s=0.001).claim(worker)
    wait_for_lapse(client, lease.deadline_ms)
    return lease
