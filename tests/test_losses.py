"""The loss rules of DESIGN.md, table-driven."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from negcase.processes.losses import (
    assess_trade,
    negative_case,
    outcome_of,
    priority_for,
    should_have_done,
)
from negcase.runtime.settings import Settings
from negcase.schemas.trade import TradeClosed, TradeDefaults, validate_trade
from negcase.sim.bars import Bars
from negcase.sim.trading import Terms, best_action, closed_trade

SETTINGS = Settings()


def trade(
    side: str,
    entry: float,
    exit_: float,
    leverage: float = 1.0,
    fee: float = 0.0,
    quantity: float = 1.0,
) -> TradeClosed:
    return TradeClosed(
        trade_id="t",
        symbol="ETH/USDT",
        side=side,
        entry_price=entry,
        exit_price=exit_,
        quantity=quantity,
        leverage=leverage,
        fee_rate=fee,
        opened_at_ms=None,
        closed_at_ms=None,
        confidence=None,
        model_version=None,
        rule_side=None,
        features=None,
        market_state_before=None,
        market_state_after=None,
        technical_indicators=None,
        tick_data=None,
        extra={},
    )


@pytest.mark.parametrize(
    ("side", "entry", "exit_", "leverage", "fee", "loss", "pnl_pct", "priority", "action"),
    [
        # the README example: a 1 % loss at leverage 1 is priority 1
        ("BUY", 3000, 2970, 1, 0, True, -1.0, 1, "SELL"),
        ("BUY", 3000, 3030, 1, 0, False, 1.0, None, None),
        # SELL: a rising market is the loss
        ("SELL", 100, 103, 1, 0, True, -3.0, 3, "BUY"),
        ("SELL", 100, 97, 1, 0, False, 3.0, None, None),
        # leverage 500, no fee: a 0.1 % move against is a 50 % loss
        ("BUY", 1000, 999, 500, 0, True, -50.0, 5, "SELL"),
        # leverage 500, a move below the minimum profitable one: HOLD
        ("SELL", 10000, 10005, 500, 0, True, -25.0, 5, "HOLD"),
        # a fee turns a tiny win into a loss: the market went the right way, HOLD
        ("BUY", 1000, 1000.2, 10, 0.001, True, -0.8, 1, "HOLD"),
        # leverage multiplies loss
        ("BUY", 200, 196, 5, 0, True, -10.0, 4, "SELL"),
        # break-even, no fee: nothing was lost, so it is not a loss
        ("BUY", 3000, 3000, 1, 0, False, 0.0, None, None),
        ("SELL", 3000, 3000, 20, 0, False, 0.0, None, None),
    ],
)
def test_loss_rules(side, entry, exit_, leverage, fee, loss, pnl_pct, priority, action):
    # given a closed trade, when its outcome is computed
    t = trade(side, entry, exit_, leverage, fee)
    outcome = outcome_of(t)
    # then loss, P&L, priority and the lesson's action follow DESIGN.md
    assert outcome.is_loss is loss
    assert outcome.pnl_pct == pytest.approx(pnl_pct, abs=1e-9)
    if loss:
        case = negative_case(t, outcome, SETTINGS, now_ms=1)
        assert case.training_priority == priority
        assert case.what_should_have_been_done == action
        assert case.training_epochs == (100 * priority) * 2
        assert case.loss_percentage == pytest.approx(-pnl_pct)


@pytest.mark.parametrize(
    ("loss_pct", "priority"),
    [
        (10.000001, 5),
        (10.0, 4),
        (5.000001, 4),
        (5.0, 3),
        (2.000001, 3),
        (2.0, 2),
        (1.000001, 2),
        (1.0, 1),
        (0.01, 1),
        (500.0, 5),
    ],
)
def test_priority_thresholds_are_strictly_over(loss_pct, priority):
    assert priority_for(loss_pct, SETTINGS.priority_thresholds_pct) == priority


def test_threshold_edges_from_real_prices_do_not_fall_on_float_noise():
    # (2700 - 3000) / 3000 is -0.1 in exact arithmetic: a 10 % loss is priority 4, not 5.
    assert (
        negative_case(
            trade("BUY", 3000, 2700), outcome_of(trade("BUY", 3000, 2700)), SETTINGS, 1
        ).training_priority
        == 4
    )


def test_loss_amount_is_in_quote_units_of_the_notional():
    t = trade("BUY", 3000, 2970, leverage=10, quantity=0.1)
    case = negative_case(t, outcome_of(t), SETTINGS, 1)
    assert case.loss_amount == pytest.approx(3.0)  # 1 % of 300 notional
    assert case.loss_percentage == pytest.approx(10.0)  # of the margin at risk (30)


def test_minimum_profitable_move_and_thresholds_are_settings():
    strict = Settings(min_profitable_move_pct=2.0, priority_thresholds_pct=(40, 30, 20, 0.5))
    t = trade("BUY", 100, 99)
    outcome = outcome_of(t)
    assert should_have_done(t, outcome, strict.min_profitable_move_pct) == "HOLD"
    assert negative_case(t, outcome, strict, 1).training_priority == 2


def test_lesson_is_a_readable_sentence():
    t = trade("BUY", 3000, 2970)
    case = negative_case(t, outcome_of(t), SETTINGS, 1)
    assert case.lesson_learned == (
        "Should have SOLD ETH/USDT instead of BUYING: the market moved 1.00 % against the position."
    )


def skip(entry: float, exit_: float, fee: float = 0.0) -> TradeClosed:
    """A decision not to trade, reported with the market's move over its horizon."""
    return validate_trade(
        {
            "trade_id": "s1",
            "symbol": "EUR/USD",
            "side": "HOLD",
            "entry_price": entry,
            "exit_price": exit_,
            "fee_rate": fee,
            "leverage": 10,
            "features": [0.1] * 8,
        },
        TradeDefaults(),
    )


def test_a_skip_that_missed_a_move_is_an_opportunity_case_prioritized_by_the_missed_gain():
    """Given a skipped decision after which the market rose 3 %, then it is a case that says
    BUY, prioritized as a loss of the 30 % it missed at leverage 10 would be."""
    assessment = assess_trade(skip(100.0, 103.0), SETTINGS, 1)
    assert assessment.kind == "opportunity"
    case = assessment.case
    assert case.what_should_have_been_done == "BUY"
    assert case.loss_percentage == pytest.approx(30.0)
    assert case.training_priority == 5
    assert "instead of staying out" in case.lesson_learned
    assert assessment.outcome.label == "BUY"


def test_a_skip_over_a_move_too_small_to_pay_is_a_right_skip_not_a_case():
    assessment = assess_trade(skip(100.0, 100.05), SETTINGS, 1)
    assert (assessment.kind, assessment.case) == ("skip", None)
    assert assessment.outcome.label == "HOLD"


def with_features(t: TradeClosed) -> TradeClosed:
    return dataclasses.replace(t, features=[0.1] * 8)


def test_every_outcome_carries_the_hindsight_label_whatever_was_done():
    """A win teaches its side, a loss the side that would have paid."""
    with_features = [0.1] * 8
    win = assess_trade(
        dataclasses.replace(trade("BUY", 3000, 3100), features=with_features), SETTINGS, 1
    )
    loss = assess_trade(
        dataclasses.replace(trade("BUY", 3000, 2900), features=with_features), SETTINGS, 1
    )
    assert (win.kind, win.case, win.outcome.label) == ("win", None, "BUY")
    assert (loss.kind, loss.outcome.label) == ("loss", "SELL")
    assert loss.case.what_should_have_been_done == "SELL"


@pytest.mark.parametrize(
    ("entry", "exit_", "fee", "min_move_pct", "label"),
    [
        (2, 3.0, 0.5, 1.0, "HOLD"),  # up by exactly the fee: a trade would earn nothing
        (2, 3.2, 0.5, 1.0, "BUY"),
        (2, 1.0, 0.5, 1.0, "HOLD"),  # down by exactly the fee
        (2, 0.9, 0.5, 1.0, "SELL"),
        (2, 2.02, 0.0, 1.0, "BUY"),  # exactly the minimum profitable move, no fee
        (2, 2.018, 0.0, 1.0, "HOLD"),
        # 0.1 % as the detector computes it, (exit - entry) / entry; close / open - 1 falls
        # a float's width short of it
        (250, 250.25, 0.0, 0.1, "BUY"),
    ],
)
def test_the_backtests_hindsight_label_is_the_detectors_on_the_same_prices(
    entry, exit_, fee, min_move_pct, label
):
    """The offline model learns best_action on every bar; the trainers learn the detector's
    label. Both must be the same rule on the same prices, boundaries included."""
    prices = ([entry, entry], [entry, max(entry, exit_)], [entry, min(entry, exit_)])
    bars = Bars(
        np.array([0, 86_400_000], np.int64),
        *(np.array(column, np.float64) for column in (*prices, [entry, exit_], [0, 0])),
    )
    terms = Terms(hold=1, leverage=1.0, fee_rate=fee, min_move_pct=min_move_pct)
    sold = validate_trade(closed_trade(bars, 1, "SELL", terms, "X"), TradeDefaults())
    assert best_action(bars, 1, terms) == label
    assert should_have_done(sold, outcome_of(sold), min_move_pct) == label
