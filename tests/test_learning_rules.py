"""The learning rules, pure: hindsight labels, counterfactual P&L, the trading gate, and the
pull toward the parent that keeps one case from flipping the whole policy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from negcase.processes.model import ModelSpec, build_model
from negcase.processes.training import (
    Examples,
    TradingResult,
    fit_history,
    gate_reason,
    trading_result,
    train_on_cases,
)
from negcase.runtime.settings import Settings
from negcase.schemas.outcome import Outcome, hindsight_action, pnl_of

MIN_MOVE = 0.001


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the trainers do: small models train fastest on one thread, and two busy threads
    on a shared two-core machine slow each other tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outcome(n: int, features: list[float], market_move: float, fee: float = 0.0) -> Outcome:
    """A decision whose market moved `market_move` (a fraction) over its horizon."""
    label = hindsight_action(market_move, fee, MIN_MOVE)
    return Outcome(f"t{n}", "skip", "HOLD", label, market_move, fee, 1.0, features, n)


@pytest.mark.parametrize(
    ("move", "fee", "expected"),
    [
        (0.02, 0.0, "BUY"),
        (-0.02, 0.0, "SELL"),
        (0.0005, 0.0, "HOLD"),  # under the minimum profitable move
        (0.002, 0.003, "HOLD"),  # the right side, but fees eat it
        (-0.004, 0.003, "SELL"),
    ],
)
def test_the_hindsight_label_is_the_action_that_would_have_paid(move, fee, expected) -> None:
    assert hindsight_action(move, fee, MIN_MOVE) == expected


def test_counterfactual_pnl_of_each_action() -> None:
    assert pnl_of("BUY", 0.01, 0.001, 10) == pytest.approx(9.0)
    assert pnl_of("SELL", 0.01, 0.001, 10) == pytest.approx(-11.0)
    assert pnl_of("HOLD", 0.01, 0.001, 10) == 0.0


def test_an_outcome_survives_its_stored_form() -> None:
    original = outcome(7, [0.5] * 8, -0.03, fee=0.001)
    assert Outcome.from_msgpack(original.to_msgpack()) == original


def test_trading_result_scores_the_models_policy_on_each_decision() -> None:
    """Given a model that always answers BUY, then its result is what BUY made on each."""
    model = build_model(ModelSpec(8))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[-1].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # BUY, SELL, HOLD
    window = [outcome(1, [0.0] * 8, 0.02), outcome(2, [0.0] * 8, -0.01)]
    result = trading_result(model, window)
    assert result == TradingResult(decisions=2, trades=2, losses=1, mean_pnl_pct=0.5)
    assert result.loss_rate == 0.5


def test_the_gate_refuses_less_pnl_and_equal_pnl_with_more_losses() -> None:
    parent = TradingResult(100, 50, 20, 0.10)
    assert gate_reason(parent, TradingResult(100, 50, 20, 0.10)) is None
    assert gate_reason(parent, TradingResult(100, 60, 20, 0.12)) is None
    assert "fell from" in gate_reason(parent, TradingResult(100, 50, 20, 0.09))
    assert "loss rate rose" in gate_reason(parent, TradingResult(100, 50, 30, 0.10))
    assert "not finite" in gate_reason(parent, TradingResult(100, 0, 0, -math.inf))
    assert gate_reason(None, TradingResult(100, 50, 20, 0.0)) is None


def test_the_gate_never_passes_a_model_with_non_finite_weights() -> None:
    model = build_model(ModelSpec(8))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    result = trading_result(model, [outcome(1, [1.0] * 8, 0.02)])
    assert gate_reason(TradingResult(1, 1, 0, 2.0), result) is not None


def _rule_examples(n: int, seed: int) -> tuple[Examples, list[list[float]]]:
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=rng)
    moves = (x[:, 0] * 0.01).tolist()
    rows = [
        (x[i].tolist(), ["BUY", "SELL", "HOLD"].index(hindsight_action(m, 0, MIN_MOVE)))
        for i, m in enumerate(moves)
    ]
    return Examples.of_rows(rows, 8), [r[0] for r in rows]


# SELL where the rule of _rule_examples says BUY
CONTRARY = Examples(torch.ones(1, 8), torch.tensor([1]))


def _warm_started_on_the_rule() -> tuple[nn.Module, Examples]:
    """A model warm-started on history where the sign of x0 decides, and that history."""
    torch.manual_seed(0)
    history, _ = _rule_examples(600, seed=1)
    model = build_model(ModelSpec(8))
    fit_history(model, history, 60, lambda: False, torch.Generator().manual_seed(0))
    return model, history


def _one_contrary_session(model: nn.Module, history: Examples, anchor_weight: float) -> None:
    """The contrary case trained for the largest epoch budget beside replay, at the
    deployment's learning rate."""
    train_on_cases(
        model,
        CONTRARY,
        history,
        1000,
        Settings().learning_rate,
        anchor_weight,
        0,
        lambda: False,
        torch.Generator().manual_seed(0),
    )


def test_one_intensive_case_does_not_flip_a_learned_policy() -> None:
    """Given a model warm-started on history where the sign of x0 decides, when one case that
    says the opposite trains for the largest epoch budget beside replay, then the model still
    agrees with the rule on almost all fresh inputs."""
    model, history = _warm_started_on_the_rule()
    fresh, _ = _rule_examples(400, seed=2)
    before = (model(fresh.features).argmax(1) == fresh.labels).float().mean().item()
    _one_contrary_session(model, history, Settings().anchor_weight)  # the deployment's pull
    after = (model(fresh.features).argmax(1) == fresh.labels).float().mean().item()
    assert before > 0.8
    assert after > before - 0.1


def test_the_pull_toward_the_parent_keeps_one_session_close_to_it() -> None:
    """Given a warm-started model, when one case trains its largest budget beside replay with
    the deployment's pull and with none, then the pull ends much nearer the parent."""
    parent, history = _warm_started_on_the_rule()

    def squared_move(anchor_weight: float) -> float:
        model = build_model(ModelSpec(8))
        model.load_state_dict(parent.state_dict())
        _one_contrary_session(model, history, anchor_weight)
        moved = zip(model.parameters(), parent.parameters(), strict=True)
        return sum(((p - q) ** 2).sum().item() for p, q in moved)

    pull = Settings().anchor_weight
    assert pull > 0
    assert squared_move(pull) * 5 < squared_move(0.0)
