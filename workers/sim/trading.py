"""Trading on bars, for the backtest: a position's trade-close event, its result by the loss
detector's own rule, the control rule, and the best action in hindsight.

A decision at bar t opens a position at bar t's open and closes it at the close of bar
t + hold - 1; the features it was made on come from the bars before t (features.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from negcase.processes.losses import outcome_of
from negcase.schemas.outcome import hindsight_action, price_move
from negcase.schemas.trade import TradeDefaults, validate_trade
from negcase.sim.bars import Bars

# The control rule: time-series momentum over this many bars.
CONTROL_LOOKBACK = 20
_UNSAFE_IN_ID = re.compile(r"[^A-Za-z0-9._:-]+")


@dataclass(frozen=True, slots=True)
class Terms:
    """How positions are traded: bars held, leverage, fee rate (a fraction of notional paid
    per round trip), and the smallest move worth trading (the detector's, in percent)."""

    hold: int
    leverage: float
    fee_rate: float
    min_move_pct: float


def control_side(bars: Bars, t: int) -> str:
    """The control rule, the engine's own rule without negcase: BUY when the last close is
    above the close CONTROL_LOOKBACK bars before it, SELL when below, HOLD when equal or
    when there is not that much history. It reads bars before t only."""
    if t - 1 - CONTROL_LOOKBACK < 0:
        return "HOLD"
    now, then = bars.close[t - 1], bars.close[t - 1 - CONTROL_LOOKBACK]
    if now > then:
        return "BUY"
    return "SELL" if now < then else "HOLD"


def exit_bar(t: int, terms: Terms) -> int:
    """The bar at whose close a position opened at bar t's open is closed."""
    return t + terms.hold - 1


def best_action(bars: Bars, t: int, terms: Terms) -> str:
    """What would have paid at bar t, in hindsight: the label the loss detector gives the
    position opened there, by its own rule on the same prices (a side when the market moved
    its way by at least the smallest move worth trading and by more than the fee, HOLD
    otherwise), for every bar (the offline model learns it)."""
    move = price_move(float(bars.open[t]), float(bars.close[exit_bar(t, terms)]))
    return hindsight_action(move, terms.fee_rate, terms.min_move_pct / 100)


def trade_id(symbol: str, t: int) -> str:
    """The trade id of the position opened at bar t: the same in every run, so the case ids
    derived from it (and which cases are held out) are too."""
    return f"bt-{_UNSAFE_IN_ID.sub('-', symbol)[:64]}-{t}"


def closed_trade(bars: Bars, t: int, side: str, terms: Terms, symbol: str) -> dict[str, Any]:
    """The trade-close event of a `side` position opened at bar t, as an engine publishes
    it, without the decision's features and model version (the caller adds them)."""
    last = exit_bar(t, terms)
    return {
        "trade_id": trade_id(symbol, t),
        "symbol": symbol,
        "side": side,
        "entry_price": float(bars.open[t]),
        "exit_price": float(bars.close[last]),
        "quantity": 1.0,
        "leverage": terms.leverage,
        "fee_rate": terms.fee_rate,
        "opened_at": int(bars.times_ms[t]),
        "closed_at": int(bars.times_ms[last]),
        "market_state_before": {"bar": bars.label(t - 1), "close": float(bars.close[t - 1])},
        "market_state_after": {"bar": bars.label(last), "close": float(bars.close[last])},
    }


def pnl_pct(trade: dict[str, Any], feature_count: int) -> float:
    """The trade's result on the margin at risk, in percent, computed exactly as the loss
    detector computes it (a trade is a loss when this is below 0). The trade is validated
    as the detector validates it, so one it would dead-letter fails here, by name."""
    defaults = TradeDefaults(feature_count=feature_count)
    return outcome_of(validate_trade(trade, defaults)).pnl_pct


def side_pnl_pct(bars: Bars, t: int, side: str, terms: Terms, symbol: str) -> float | None:
    """The result of taking `side` at bar t, or None for HOLD (no trade)."""
    if side == "HOLD":
        return None
    return pnl_pct(closed_trade(bars, t, side, terms, symbol), feature_count=0)
