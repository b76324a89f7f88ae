"""The loss rules: from a closed trade to a priority, an epoch count and a lesson."""

from __future__ import annotations

import math
from dataclasses import dataclass

from negcase.runtime.settings import Settings
from negcase.schemas.case import NegativeCase, case_id_for
from negcase.schemas.trade import TradeClosed, TradeError

_OPPOSITE = {"BUY": "SELL", "SELL": "BUY"}
_GERUND = {"BUY": "BUYING", "SELL": "SELLING"}
_PAST = {"BUY": "BOUGHT", "SELL": "SOLD"}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a closed trade did: its move and result from the position's side."""

    move_pct: float
    pnl_pct: float
    pnl_amount: float

    @property
    def is_loss(self) -> bool:
        """A trade is a loss when it lost money on the margin at risk, fees included."""
        return self.pnl_pct < 0


def outcome_of(trade: TradeClosed) -> Outcome:
    """Move and P&L of a trade; move is signed by side (+ when the market went its way)."""
    move = (trade.exit_price - trade.entry_price) / trade.entry_price
    if trade.side == "SELL":
        move = -move
    # Percent of the margin at risk; rounded so 1 % computes as exactly 1, not 0.99999...
    pnl_pct = round((move - trade.fee_rate) * trade.leverage * 100, 9)
    pnl_amount = trade.entry_price * trade.quantity * (move - trade.fee_rate)
    # Each number can be finite and in range while their product is not (1e-300 to 1e300).
    if not (math.isfinite(pnl_pct) and math.isfinite(pnl_amount)):
        raise TradeError("entry", "prices, quantity and leverage give a P&L that is not finite")
    return Outcome(move_pct=round(move * 100, 9), pnl_pct=pnl_pct, pnl_amount=pnl_amount)


def priority_for(loss_pct: float, thresholds_pct: tuple[float, ...]) -> int:
    """5 over the first threshold (10 %), 4 over the second (5 %), ... 1 otherwise."""
    for rank, threshold in enumerate(thresholds_pct):
        if loss_pct > threshold:
            return 5 - rank
    return 1


def should_have_done(trade: TradeClosed, outcome: Outcome, min_move_pct: float) -> str:
    """The opposite side when the market moved against the position by at least the minimum
    profitable move; HOLD otherwise (a move too small to pay, or fees ate a good call)."""
    if -outcome.move_pct >= min_move_pct:
        return _OPPOSITE[trade.side]
    return "HOLD"


def lesson_for(trade: TradeClosed, outcome: Outcome, action: str) -> str:
    """One sentence a person can read."""
    doing = _GERUND[trade.side]
    if action == "HOLD":
        return (
            f"Should have stayed out of {trade.symbol} instead of {doing}: the market moved "
            f"{outcome.move_pct:+.2f} % for the position, too little to pay for the trade."
        )
    return (
        f"Should have {_PAST[action]} {trade.symbol} instead of {doing}: "
        f"the market moved {abs(outcome.move_pct):.2f} % against the position."
    )


def negative_case(
    trade: TradeClosed, outcome: Outcome, settings: Settings, now_ms: int
) -> NegativeCase:
    """The NegativeCase for a losing trade."""
    loss_pct = -outcome.pnl_pct
    priority = priority_for(loss_pct, settings.priority_thresholds_pct)
    action = should_have_done(trade, outcome, settings.min_profitable_move_pct)
    return NegativeCase(
        case_id=case_id_for(trade.trade_id),
        trade_id=trade.trade_id,
        symbol=trade.symbol,
        side=trade.side,
        entry_price=trade.entry_price,
        exit_price=trade.exit_price,
        quantity=trade.quantity,
        leverage=trade.leverage,
        fee_rate=trade.fee_rate,
        move_pct=outcome.move_pct,
        pnl_pct=outcome.pnl_pct,
        loss_percentage=loss_pct,
        loss_amount=-outcome.pnl_amount,
        what_should_have_been_done=action,
        lesson_learned=lesson_for(trade, outcome, action),
        training_priority=priority,
        training_epochs=settings.epochs_for(priority),
        created_at_ms=now_ms,
        opened_at_ms=trade.opened_at_ms,
        closed_at_ms=trade.closed_at_ms,
        confidence=trade.confidence,
        model_version=trade.model_version,
        features=trade.features,
        market_state_before=trade.market_state_before,
        market_state_after=trade.market_state_after,
        technical_indicators=trade.technical_indicators,
        tick_data=trade.tick_data,
        extra=trade.extra,
    )
