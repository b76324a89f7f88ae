"""Live traffic for the canary tests: models trained on a market's hidden rule (rightly,
inverted, or on coin flips), and engines that ask for a signal before each decision, trade
what they are told (or, with a rule of their own, follow it when the reply has no opinion),
and report the closed trade with the version that answered (and their rule's side)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis
import torch
from torch import nn

from negcase.client.signal_client import SignalClient, SignalTimeout
from negcase.client.trades import publish_trades
from negcase.processes.model import (
    build_model,
    sha256_hex,
    spec_from_settings,
    state_of,
    weights_bytes,
)
from negcase.runtime.settings import Settings
from negcase.schemas.signal import Signal, SignalRequestError
from negcase.sim.engine import Market, Situation
from negcase.store.checkpoints import CheckpointRegistry
from tests.serving import checkpoint_meta

MARKET_SEED = 11
LABELS = ("right", "inverted", "coin_flips")


def situations(stream_seed: int, count: int) -> list[Situation]:
    """Situations of one regime of the market, the same rule for every stream."""
    market = Market(seed=MARKET_SEED, stream_seed=stream_seed)
    return [market.situation(regime=0) for _ in range(count)]


def trained_model(settings: Settings, labels: str, seed: int) -> nn.Module:
    """A model trained to BUY before a rise and SELL before a fall (`right`), the opposite
    (`inverted`: a deliberately bad checkpoint), or on coin flips (a model of no skill)."""
    seen = situations(1000 + seed, 600)
    features = torch.tensor([s.features for s in seen], dtype=torch.float32)
    rises = torch.tensor([s.move_pct > 0 for s in seen])
    if labels == "right":
        targets = torch.where(rises, 0, 1)
    elif labels == "inverted":
        targets = torch.where(rises, 1, 0)
    else:
        targets = torch.from_numpy(np.random.default_rng(seed).integers(0, 2, len(seen)))
    torch.manual_seed(seed)
    model = build_model(spec_from_settings(settings))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(80):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), targets).backward()
        optimizer.step()
    return model


def publish_trained(client: redis.Redis, settings: Settings, labels: str, seed: int) -> int:
    """Train a model (see trained_model) and publish it as a trainer would; its version."""
    registry = CheckpointRegistry(client, settings.keys)
    weights = weights_bytes(state_of(trained_model(settings, labels, seed)))
    meta = checkpoint_meta(settings)
    return registry.publish(weights, sha256_hex(weights), meta, registry.latest_version())


def model_rule(settings: Settings, seed: int) -> Callable[[Situation], str]:
    """An engine's own rule that knows the market: a model trained on its hidden rule."""
    model = trained_model(settings, "right", seed).eval()

    def side(situation: Situation) -> str:
        with torch.no_grad():
            logits = model(torch.tensor([situation.features], dtype=torch.float32))
        return ("BUY", "SELL", "HOLD")[int(logits.argmax())]

    return side


@dataclass
class LiveTrading:
    """Engines trading in threads of their own until the block ends: every reply, the trades
    reported per version, and every failure."""

    settings: Settings
    engines: int = 2
    # The engines' own rule, reported on every trade as rule_side and followed when a reply
    # has no opinion; without one they trade every reply.
    rule: Callable[[Situation], str] | None = None
    replies: list[Signal] = field(default_factory=list)
    reported: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> LiveTrading:
        for n in range(self.engines):
            thread = threading.Thread(target=self._trade, args=(n,), daemon=True)
            thread.start()
            self._running.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._running:
            thread.join(60)

    def answered_by(self, version: int) -> list[Signal]:
        """The replies that version gave."""
        return [reply for reply in list(self.replies) if reply.model_version == version]

    def _trade(self, n: int) -> None:
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=30)
        signals = SignalClient(client, self.settings.namespace)
        market = Market(seed=MARKET_SEED, stream_seed=n)
        keys = self.settings.keys
        decided = 0
        while not self._stop.is_set():
            situation = market.situation(regime=0)
            try:
                signal = signals.request(situation.features, timeout_s=30)
            except (SignalTimeout, SignalRequestError, redis.RedisError) as error:
                self.failures.append(repr(error))
                continue
            self.replies.append(signal)
            side = signal.action
            rule = None if self.rule is None else self.rule(situation)
            if rule is not None and not signal.opinion:
                side = rule
            if side == "HOLD":
                continue
            decided += 1
            trade = {
                "trade_id": f"engine-{n}-{decided}",
                "symbol": situation.symbol,
                "side": side,
                "entry_price": round(situation.price, 6),
                "exit_price": round(situation.price * (1 + situation.move_pct / 100), 6),
                "features": situation.features,
                "model_version": signal.model_version,
            }
            if rule is not None:
                trade["rule_side"] = rule
            publish_trades(client, keys, [trade])
            self.reported[signal.model_version] += 1
        client.close()
