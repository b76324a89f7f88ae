"""Learning, in-process on a real Redis: outcomes that went through a real detector make a
first model of the market (not of one case), later sessions keep learning, the trading gate
refuses a harmful update and says why, concurrent publishers both land (rebase), and the
validation window is never trained on."""

from __future__ import annotations

import dataclasses
import math
import threading

import orjson
import pytest
import redis
import torch

from negcase.processes.model import ModelSpec, build_model, load_verified, state_of
from negcase.processes.publishing import publish_update
from negcase.processes.trainer import Trainer
from negcase.processes.training import Examples, TradingResult, Update, gate_reason, measure
from negcase.runtime.settings import Settings
from negcase.schemas.case import ACTIONS, case_id_for
from negcase.schemas.outcome import Outcome
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.outcomes import OutcomeStore
from negcase.store.queue import is_held_out
from negcase.store.sessions import SessionStore
from tests.conftest import run_burst, worker_env
from tests.training_cases import (
    add_cases,
    assert_conserved,
    detect,
    held_out_trade,
    make_case,
    publish_constant_policy,
    rule_cases,
    rule_trades,
)

State = dict[str, torch.Tensor]


def trained(client: redis.Redis, settings: Settings) -> Trainer:
    """A trainer that drained the queue."""
    trainer = Trainer(client, settings, "t1", Archive(settings.data_dir))
    run_burst(trainer, timeout_s=120)
    return trainer


def latest_model(client: redis.Redis, settings: Settings) -> torch.nn.Module:
    model = build_model(ModelSpec(settings.feature_count, settings.hidden_sizes))
    stored = CheckpointRegistry(client, settings.keys).fetch_latest()
    assert stored is not None
    load_verified(stored, model, settings.feature_count)
    return model


def test_outcomes_make_a_first_model_of_the_market_and_sessions_build_on_it(
    client, settings
) -> None:
    torch.set_num_threads(1)
    settings = settings.with_overrides(cases_per_claim=8, min_outcomes=300, seed=0)
    unseen = Examples.of(rule_cases(500, seed=99), settings.feature_count)
    torch.manual_seed(settings.seed)
    before = measure(build_model(ModelSpec(8, settings.hidden_sizes)), unseen)

    # given 200 outcomes: fewer than the minimum, so no checkpoint, however many cases
    detect(client, settings, rule_trades(200, seed=1))
    assert trained(client, settings).outcomes == {}
    assert CheckpointRegistry(client, settings.keys).latest_version() is None

    # when 400 more arrive and a trainer drains the queue
    detect(client, settings, rule_trades(400, seed=2))
    outcomes = trained(client, settings).outcomes

    # then the first checkpoint was a warm start on every outcome, and it learnt the rule
    first = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir)).fetch_anywhere(1)
    assert first.meta["metrics"]["warm_start"] is True
    assert first.meta["metrics"]["replay_count"] > 400
    after = measure(latest_model(client, settings), unseen)
    assert outcomes["published"] >= 2
    assert after.accuracy >= 0.7 and after.accuracy >= before.accuracy + 0.25, (before, after)
    assert_conserved(client, settings)


def test_the_gate_refuses_a_harmful_update_and_says_why(client, settings) -> None:
    torch.set_num_threads(1)
    settings = settings.with_overrides(cases_per_claim=16, min_outcomes=200)
    detect(client, settings, rule_trades(400, seed=1))
    trained(client, settings)
    registry = CheckpointRegistry(client, settings.keys)
    published = registry.latest_version()
    assert published is not None
    # Market situations with every label wrong, trained hard, with no pull toward the parent.
    flipped = [
        dataclasses.replace(
            case,
            case_id=f"nc-bad-{n:03d}",
            trade_id=f"bad-{n}",
            training_epochs=600,
            what_should_have_been_done=ACTIONS[(case.label + 1) % 3],
        )
        for n, case in enumerate(rule_cases(60, seed=5))
        if not is_held_out(f"nc-bad-{n:03d}", settings.heldout_share)
    ]
    add_cases(client, settings, flipped)
    harmful = settings.with_overrides(
        cases_per_claim=60, anchor_weight=0.0, early_stop_patience=0, learning_rate=0.01
    )

    trainer = trained(client, harmful)

    assert trainer.outcomes == {"rejected": 1}
    assert registry.latest_version() == published
    reason = client.hget(settings.keys.rejected, "nc-bad-000").decode()
    assert reason.startswith("mean P&L per decision fell from")
    [completed] = [
        fields
        for _, fields in client.xrange(settings.keys.events)
        if fields[b"type"] == b"training_completed" and b"nc-bad-000" in fields[b"cases"]
    ]
    assert completed[b"outcome"] == b"rejected" and completed[b"rejected_reason"].decode() == reason
    # The session records the gate's figures, parent and candidate.
    [session] = [
        s
        for s in SessionStore(client, settings.keys, None).recent(50)
        if "nc-bad-000" in s.case_ids
    ]
    before, after = session.metrics["validation_before"], session.metrics["validation_after"]
    assert after["mean_pnl_pct"] < before["mean_pnl_pct"]
    assert before["decisions"] == after["decisions"] > 0
    # Trained is trained: the count moves in Redis and in the archive, published or not.
    [stored] = CaseStore(client, settings.keys).get_many(["nc-bad-000"])
    assert stored.retraining_count == 1 and stored.last_retrained_ms
    assert Archive(settings.data_dir).read_case("nc-bad-000").retraining_count == 1


def test_an_update_that_trades_worse_than_its_parent_on_the_window_is_refused(
    client, settings
) -> None:
    # given v1, a policy that always holds, and a validation window with a BUY that lost
    publish_constant_policy(client, settings, "HOLD")
    detect(client, settings, [held_out_trade([1.0] * 8, "BUY", -0.02)])
    # and a case that teaches BUY (what test_trainer's paused "ack" story relies on)
    case = make_case(1, [1.0] * 8, action="BUY", epochs=100)
    add_cases(client, settings, [case])

    # when a trainer learns it, its update buys everywhere
    trainer = trained(client, settings)

    # then the gate refuses it for trading worse than v1, and says so on the case
    assert trainer.outcomes == {"rejected": 1}
    assert CheckpointRegistry(client, settings.keys).latest_version() == 1
    reason = client.hget(settings.keys.rejected, case.case_id).decode()
    assert reason.startswith("mean P&L per decision fell from +0.0000 % to -2.0000 %"), reason


PARENT = TradingResult(decisions=100, trades=40, losses=10, mean_pnl_pct=0.5)


@pytest.mark.parametrize(
    ("parent", "candidate", "refused"),
    [
        (PARENT, TradingResult(100, 40, 10, 0.5), False),  # as good: published
        (PARENT, TradingResult(100, 40, 10, 0.5 - 1e-6), True),  # any fall: no tolerance
        (PARENT, TradingResult(100, 40, 11, 0.5), True),  # as much, but loses more often
        (PARENT, TradingResult(100, 60, 30, 0.6), False),  # earns more: may lose more often
        (PARENT, TradingResult(100, 0, 0, -math.inf), True),  # output not finite
        (None, TradingResult(100, 0, 0, -math.inf), True),  # not finite, even with no parent
        (None, TradingResult(100, 40, 30, -3.0), False),  # no parent to judge against
    ],
)
def test_the_trading_gate_has_no_tolerance(parent, candidate, refused) -> None:
    reason = gate_reason(parent, candidate)
    assert (reason is not None) is refused, reason


def linear_state(bias: dict[str, float], weights: dict[tuple[str, int], float]) -> State:
    """Weights of a linear model (ModelSpec(8, ())): logits = W x + b, given by action."""
    weight, bias_ = torch.zeros(len(ACTIONS), 8), torch.zeros(len(ACTIONS))
    for action, value in bias.items():
        bias_[ACTIONS.index(action)] = value
    for (action, feature), value in weights.items():
        weight[ACTIONS.index(action), feature] = value
    return {"0.weight": weight, "0.bias": bias_}


def falling_market(feature: int) -> Outcome:
    """A held-out decision at one-hot features where the market fell 2 %: SELL paid."""
    features = [1.0 if i == feature else 0.0 for i in range(8)]
    return Outcome(f"v{feature}", "skip", "HOLD", "SELL", -0.02, 0.0, 1.0, features, 0)


def test_after_a_rebase_the_gate_judges_against_the_latest_model(client, settings) -> None:
    # given a window of three decisions where selling paid, v1 that holds (earns 0), and
    # v2 from another trainer that sells (earns +2 % a decision)
    spec, scratch = ModelSpec(8, ()), build_model(ModelSpec(8, ()))
    window = [falling_market(feature) for feature in range(3)]
    registry = CheckpointRegistry(client, settings.keys)
    meta = {"feature_count": 8, "model_spec": spec.to_dict(), "case_ids": []}
    base = linear_state({"HOLD": 0.01}, {})
    latest = linear_state({"HOLD": 0.01, "SELL": 0.02}, {})
    for update in (Update(None, base, base), Update(1, base, latest)):
        assert publish_update(registry, update, scratch, 8, window, meta).version
    # and a stale update built on v1 that buys on the first decision: replayed on v2 it
    # earns +0.67 % a decision, better than v1 but worse than v2
    stale = Update(1, base, {n: base[n] + linear_state({}, {("BUY", 0): 1.0})[n] for n in base})

    # when it is published
    result = publish_update(registry, stale, scratch, 8, window, meta)

    # then it was rebased on v2 and judged against v2, so it is refused and v2 stays latest
    assert (result.rebases, result.parent_version) == (1, 2)
    assert result.trading_before.mean_pnl_pct == pytest.approx(2.0)
    assert result.trading_after.mean_pnl_pct == pytest.approx(2 / 3)
    assert result.rejected_reason and result.version is None
    assert registry.latest_version() == 2


def test_a_candidate_whose_output_is_not_finite_is_never_published(client, settings) -> None:
    # given no checkpoint yet, a validation window, and a candidate with a NaN weight
    spec, scratch = ModelSpec(8, ()), build_model(ModelSpec(8, ()))
    registry = CheckpointRegistry(client, settings.keys)
    meta = {"feature_count": 8, "model_spec": spec.to_dict(), "case_ids": []}
    base = linear_state({"HOLD": 0.01}, {})
    broken = linear_state({"HOLD": math.nan}, {})
    # when it is published as the first model, then it is refused: no parent is needed
    result = publish_update(
        registry, Update(None, base, broken), scratch, 8, [falling_market(0)], meta
    )
    # refused before the gate looks: its weights are not finite (the trainer's own check)
    assert "NaN or infinity" in result.rejected_reason
    assert registry.latest_version() is None


def test_a_candidate_whose_output_overflows_is_never_published(client, settings) -> None:
    # given no checkpoint yet, and a candidate whose weights are finite but whose output on
    # a decision of the window overflows float32 (3e38 + 3e38)
    spec, scratch = ModelSpec(8, ()), build_model(ModelSpec(8, ()))
    registry = CheckpointRegistry(client, settings.keys)
    meta = {"feature_count": 8, "model_spec": spec.to_dict(), "case_ids": []}
    base = linear_state({"HOLD": 0.01}, {})
    huge = linear_state({"BUY": 3e38}, {("BUY", 0): 3e38})
    # when it is published as the first model, then the gate refuses it: no parent needed
    result = publish_update(
        registry, Update(None, base, huge), scratch, 8, [falling_market(0)], meta
    )
    assert result.rejected_reason == "the candidate's output is not finite"
    assert registry.latest_version() is None


def test_concurrent_publishers_both_land_through_rebase(client, settings) -> None:
    spec = ModelSpec(8, (4,))
    registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir))
    base = state_of(build_model(spec))
    meta = {"feature_count": 8, "model_spec": spec.to_dict(), "case_ids": []}
    first = publish_update(registry, Update(None, base, base), build_model(spec), 8, [], meta)
    deltas = [
        {name: torch.full_like(value, step) for name, value in base.items()} for step in (0.25, 0.5)
    ]
    updates = [
        Update(first.version, base, {name: base[name] + delta[name] for name in base})
        for delta in deltas
    ]
    results = []
    threads = [
        threading.Thread(
            target=lambda u=update: results.append(
                publish_update(registry, u, build_model(spec), 8, [], meta)
            )
        )
        for update in updates
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(r.version for r in results) == [2, 3]
    assert sorted(r.rebases for r in results) == [0, 1]
    lineage = registry.list()
    assert [info.meta["parent_version"] for info in lineage] == [None, 1, 2]
    final = registry.fetch_latest()
    model = build_model(spec)
    load_verified(final, model, 8)
    for name, value in model.state_dict().items():
        assert torch.allclose(value, base[name] + 0.75), name  # both updates are in


def test_held_out_outcomes_only_judge_and_every_other_outcome_is_replayed(client, settings) -> None:
    torch.set_num_threads(1)
    # given decisions, some of which the id rule holds out
    settings = settings.with_overrides(cases_per_claim=8, min_outcomes=100)
    trades = rule_trades(240, seed=3)
    held = {t["trade_id"] for t in trades if is_held_out(case_id_for(t["trade_id"]), 0.1)}
    assert len(held) >= 10

    # when a detector records them and a trainer drains the queue
    detect(client, settings, trades)
    trained(client, settings)

    # then the validation window holds exactly the held-out decisions, the replay store the
    # others, and no session trained a held-out case
    store = OutcomeStore(client, settings.keys, settings.outcomes_maxlen)
    assert {o.trade_id for o in store.validation_window(1000)} == held
    assert {o.trade_id for o in store.replay()} == {t["trade_id"] for t in trades} - held
    sessions = SessionStore(client, settings.keys, None).recent(100)
    trained_ids = {case_id for session in sessions for case_id in session.case_ids}
    assert trained_ids and not trained_ids & {case_id_for(t) for t in held}
    assert all(s.metrics["validation_count"] == len(held) for s in sessions if s.metrics)


def test_bootstrap_publishes_a_first_model_of_a_file_of_past_decisions(
    client, settings, spawn, tmp_path
) -> None:
    # given a file of past decisions (trades and skips) on a market with a learnable rule
    history = tmp_path / "history.jsonl"
    history.write_bytes(b"\n".join(orjson.dumps(t) for t in rule_trades(400, seed=11)))
    env = worker_env(settings)

    # when a deployment with no checkpoint is bootstrapped from it
    done = spawn("bootstrap", "--trades", str(history), "--json", env=env)
    out, err = done.communicate(timeout=120)

    # then v1 is a warm start on the file's outcomes, judged on the ones it held out
    assert done.returncode == 0, err
    figures = orjson.loads(out)
    assert figures["version"] == 1 and figures["outcomes_trained"] > 300
    assert figures["outcomes_held_out"] > 0
    unseen = Examples.of(rule_cases(500, seed=99), settings.feature_count)
    assert measure(latest_model(client, settings), unseen).accuracy >= 0.7
    # and a second bootstrap refuses to replace it unless told to
    again = spawn("bootstrap", "--trades", str(history), env=env)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and "v1 is already published" in err


def test_bootstrap_names_the_line_and_field_of_a_bad_trade(settings, spawn, tmp_path) -> None:
    history = tmp_path / "history.jsonl"
    good, bad = rule_trades(2, seed=1)
    history.write_bytes(orjson.dumps(good) + b"\n" + orjson.dumps({**bad, "side": "LONG"}))
    done = spawn("bootstrap", "--trades", str(history), env=worker_env(settings))
    _, err = done.communicate(timeout=60)
    assert done.returncode == 2
    assert "trade 2: side: expected 'BUY', 'SELL' or 'HOLD'" in err
