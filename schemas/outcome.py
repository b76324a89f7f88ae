"""Outcome: what one decision of an engine led to, as the learner sees it.

Every decision ends in one outcome: a win, a loss, or a skip (the engine stayed out and
reported the market's move over its horizon as a TradeClosed with side HOLD). Whatever the
engine did, the market's move tells which action would have paid, so every outcome carries
the hindsight label: learning never depends on the engine having traded. Losses and missed
opportunities also become prioritized NegativeCases; every outcome joins the capped replay
store `<ns>:outcomes` (context: what was right beside what was wrong), and the held-out ones
the validation window `<ns>:outcomes:validation` that the gate judges candidates on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack

from negcase.schemas.case import ACTIONS

KINDS = ("win", "loss", "skip", "opportunity")


def price_move(entry_price: float, exit_price: float) -> float:
    """The market's move from entry to exit as a fraction, + when the price rose: the one
    formula every label and P&L is computed from, so that the same prices always give the
    same label, to the last bit."""
    return (exit_price - entry_price) / entry_price


def hindsight_action(market_move: float, fee_rate: float, min_move: float) -> str:
    """The action that would have paid: a side when the market moved its way by at least the
    minimum profitable move and by more than the fees, HOLD otherwise. `market_move` is the
    signed fraction (+ when the price rose); `min_move` a fraction too."""
    if market_move >= min_move and market_move > fee_rate:
        return "BUY"
    if -market_move >= min_move and -market_move > fee_rate:
        return "SELL"
    return "HOLD"


def pnl_of(action: str, market_move: float, fee_rate: float, leverage: float) -> float:
    """P&L in percent of the margin at risk had `action` been taken; 0 for HOLD."""
    if action == "HOLD":
        return 0.0
    move = market_move if action == "BUY" else -market_move
    return (move - fee_rate) * leverage * 100


@dataclass(frozen=True, slots=True)
class Outcome:
    """One decision's result, reduced to what learning and the gate need."""

    trade_id: str
    kind: str
    action_taken: str
    label: str
    market_move: float
    fee_rate: float
    leverage: float
    features: list[float]
    closed_at_ms: int
    model_version: int | None = None

    @property
    def label_index(self) -> int:
        """The label as an index into ACTIONS (the model's output order)."""
        return ACTIONS.index(self.label)

    def pnl_if(self, action: str) -> float:
        """What `action` would have made on this decision, in percent of margin."""
        return pnl_of(action, self.market_move, self.fee_rate, self.leverage)

    def to_msgpack(self) -> bytes:
        """The stored form: a msgpack map (plain data; nothing in it runs when read)."""
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, blob: bytes) -> Outcome:
        """Decode a stored outcome; fields a newer writer added are ignored."""
        data = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        return cls(**{name: data[name] for name in _FIELDS if name in data})


_FIELDS = tuple(Outcome.__dataclass_fields__)
