"""The loss rules: from a closed trade (or a skipped decision) to its outcome, and from a
loss or a missed opportunity to a negative case with a priority, an epoch count and a
lesson."""

from __future__ import annotations

import math
from dataclasses import dataclass

from negcase.runtime.settings import Settings
from negcase.schemas.case import NegativeCase, case_id_for
from negcase.schemas.outcome import Outcome, hindsight_action, pnl_of, price_move
from negcase.schemas.trade import TradeClosed, TradeError

_GERUND = {"BUY": "BUYING", "SELL": "SELLING"}
_PAST = {"BUY": "BOUGHT", "SELL": "SOLD"}


@dataclass(frozen=True, slots=True)
class TradeResult:
    """What a closed trade did: its move and result from the position's side. For a
    skipped decision (side HOLD) the move is the market's (+ when the price rose), the P&L 0."""

    move_pct: float
    pnl_pct: float
    pnl_amount: float

    @property
    def is_loss(self) -> bool:
        """A trade is a loss when it lost money on the margin at risk, fees included."""
        return self.pnl_pct < 0


def outcome_of(trade: TradeClosed) -> TradeResult:
    """Move and P&L of a trade; move is signed by side (+ when the market went its way)."""
    move = market_move(trade)
    if trade.side == "SELL":
        move = -move
    if trade.side == "HOLD":
        # A skip made nothing; what it missed must still be a finite number to prioritize.
        if not math.isfinite(abs(move) * trade.leverage * 100 * trade.entry_price * trade.quantity):
            raise TradeError("entry", "prices and leverage give a missed gain that is not finite")
        return TradeResult(move_pct=round(move * 100, 9), pnl_pct=0.0, pnl_amount=0.0)
    # Percent of the margin at risk; rounded so 1 % computes as exactly 1, not 0.99999...
    pnl_pct = round((move - trade.fee_rate) * trade.leverage * 100, 9)
    pnl_amount = trade.entry_price * trade.quantity * (move - trade.fee_rate)
    # Each number can be finite and in range while their product is not (1e-300 to 1e300).
    if not (math.isfinite(pnl_pct) and math.isfinite(pnl_amount)):
        raise TradeError("entry", "prices, quantity and leverage give a P&L that is not finite")
    return TradeResult(move_pct=round(move * 100, 9), pnl_pct=pnl_pct, pnl_amount=pnl_amount)


def priority_for(loss_pct: float, thresholds_pct: tuple[float, ...]) -> int:
    """5 over the first threshold (10 %), 4 over the second (5 %), ... 1 otherwise."""
    for rank, threshold in enumerate(thresholds_pct):
        if loss_pct > threshold:
            return 5 - rank
    return 1


def market_move(trade: TradeClosed) -> float:
    """The market's move from entry to exit as a fraction, + when the price rose."""
    return price_move(trade.entry_price, trade.exit_price)


def rule_pnl_pct(trade: TradeClosed) -> float | None:
    """What the engine's own rule would have made on this decision (TradeClosed.rule_side),
    in percent of the margin, 0 for a HOLD; None when the engine did not say (or when it is
    not finite)."""
    if trade.rule_side is None:
        return None
    pnl = pnl_of(trade.rule_side, market_move(trade), trade.fee_rate, trade.leverage)
    # One infinite value would leave a version's sums against the rule NaN for good.
    return pnl if math.isfinite(pnl) else None


def should_have_done(trade: TradeClosed, outcome: TradeResult, min_move_pct: float) -> str:
    """What would have paid, in hindsight: a side when the market moved its way by at least
    the minimum profitable move and by more than the fees, HOLD otherwise (a move too small
    to pay, or fees that eat a good call). For a loss that side is the opposite one."""
    return hindsight_action(market_move(trade), trade.fee_rate, min_move_pct / 100)


def missed_gain_pct(trade: TradeClosed, action: str) -> float:
    """What `action` would have made on a skipped decision, in percent of margin."""
    move = market_move(trade) if action == "BUY" else -market_move(trade)
    return round((move - trade.fee_rate) * trade.leverage * 100, 9)


@dataclass(frozen=True, slots=True)
class Assessment:
    """What one valid trade becomes: its kind (win, loss, skip or opportunity), the negative
    case for a loss or a missed opportunity, and the outcome learning replays (None when the
    trade carries no features)."""

    kind: str
    case: NegativeCase | None
    outcome: Outcome | None
    # The trade's P&L in percent of the margin (0 for a skip): what it made for its version.
    pnl_pct: float = 0.0


def assess_trade(trade: TradeClosed, settings: Settings, now_ms: int) -> Assessment:
    """The kind, case and outcome of one trade."""
    result = outcome_of(trade)
    action = should_have_done(trade, result, settings.min_profitable_move_pct)
    if trade.side == "HOLD":
        kind = "skip" if action == "HOLD" else "opportunity"
    else:
        kind = "loss" if result.is_loss else "win"
    case = (
        negative_case(trade, result, settings, now_ms) if kind in ("loss", "opportunity") else None
    )
    outcome = None
    if trade.features is not None:
        outcome = Outcome(
            trade_id=trade.trade_id,
            kind=kind,
            action_taken=trade.side,
            label=action,
            market_move=market_move(trade),
            fee_rate=trade.fee_rate,
            leverage=trade.leverage,
            features=trade.features,
            closed_at_ms=trade.closed_at_ms or now_ms,
            model_version=trade.model_version,
        )
    return Assessment(kind, case, outcome, result.pnl_pct)


def lesson_for(trade: TradeClosed, outcome: TradeResult, action: str) -> str:
    """One sentence a person can read."""
    if trade.side == "HOLD":
        return (
            f"Should have {_PAST[action]} {trade.symbol} instead of staying out: the market "
            f"moved {outcome.move_pct:+.2f} % over the horizon."
        )
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
    trade: TradeClosed, outcome: TradeResult, settings: Settings, now_ms: int
) -> NegativeCase:
    """The NegativeCase for a losing trade, or for a skip that missed a profitable move (its
    loss is the gain it missed, so it is prioritized as a loss of that size would be)."""
    action = should_have_done(trade, outcome, settings.min_profitable_move_pct)
    loss_pct = missed_gain_pct(trade, action) if trade.side == "HOLD" else -outcome.pnl_pct
    priority = priority_for(loss_pct, settings.priority_thresholds_pct)
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
        loss_amount=trade.entry_price * trade.quantity * loss_pct / (100 * trade.leverage),
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
