"""NegativeCase: a losing trade turned into a prioritized training example."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from negcase.schemas.trade import FLOAT32_MAX

ACTIONS = ("BUY", "SELL", "HOLD")


def trade_key(trade_id: str) -> str:
    """A trade's idempotency key: a short fixed-size digest of its id (20 hex characters),
    the same for every outcome, so a trade seen twice is recognized whatever it was."""
    return hashlib.blake2b(trade_id.encode(), digest_size=10).hexdigest()


def case_id_for(trade_id: str) -> str:
    """The case id of a trade: derived, so a redelivered or duplicated trade maps to one case."""
    return "nc-" + trade_key(trade_id)


@dataclass(slots=True)
class NegativeCase:
    """Everything known about one losing trade, what should have been done, and its training."""

    case_id: str
    trade_id: str
    symbol: str
    side: str
    entry_price: float
    exit_price: float
    quantity: float
    leverage: float
    fee_rate: float
    move_pct: float
    pnl_pct: float
    loss_percentage: float
    loss_amount: float
    what_should_have_been_done: str
    lesson_learned: str
    training_priority: int
    training_epochs: int
    created_at_ms: int
    opened_at_ms: int | None = None
    closed_at_ms: int | None = None
    confidence: float | None = None
    model_version: int | None = None
    features: list[float] | None = None
    market_state_before: dict[str, Any] | None = None
    market_state_after: dict[str, Any] | None = None
    technical_indicators: dict[str, Any] | None = None
    tick_data: list[dict[str, Any]] | None = None
    retraining_count: int = 0
    last_retrained_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> int:
        """The training label: the index of what should have been done in ACTIONS."""
        return ACTIONS.index(self.what_should_have_been_done)

    @property
    def trainable(self) -> bool:
        """Whether the case carries the model's input; cases without features are only kept."""
        return self.features is not None

    def to_dict(self) -> dict[str, Any]:
        """The case as plain data (msgpack and JSON friendly)."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def to_msgpack(self) -> bytes:
        """The stored form, in Redis and in the archive."""
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NegativeCase:
        """Build from stored data; fields a newer writer added are ignored, not fatal."""
        return cls(**{name: data[name] for name in _FIELD_NAMES if name in data})

    @classmethod
    def from_msgpack(cls, blob: bytes) -> NegativeCase:
        """Decode a stored case. msgpack builds plain data only: nothing in a blob runs."""
        return cls.from_dict(msgpack.unpackb(blob, raw=False, strict_map_key=False))


_FIELD_NAMES = tuple(f.name for f in fields(NegativeCase))


def case_problem(case: NegativeCase, feature_count: int) -> str | None:
    """Why a case cannot be trained on, or None when it can."""
    features = case.features
    if features is None or len(features) != feature_count:
        found = "none" if features is None else len(features)
        return f"features: expected {feature_count} numbers, got {found}"
    # float32 is what the model trains in: a finite float64 beyond its range is infinity.
    if not all(isinstance(x, int | float) and -FLOAT32_MAX <= x <= FLOAT32_MAX for x in features):
        return "features: not all finite numbers in float32's range"
    if case.what_should_have_been_done not in ACTIONS:
        return f"label: unknown action {case.what_should_have_been_done!r}"
    return None
