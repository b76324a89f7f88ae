"""Learning, in-process on a real Redis: outcomes that went through a real detector make a
first model of the market (not of one case), later sessions keep learning, the trading gate
refuses a harmful update and says why, concurrent publishers both land (rebase), and the
validation window is never trained on."""

from __future__ import annotations

import dataclasses
import threading

import orjson
import redis
import torch

from negcase.processes.model import ModelSpec, build_model, load_verified, state_of
from negcase.processes.publishing import publish_update
from negcase.processes.trainer import Trainer
from negcase.processes.training import Examples, Update, measure
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.case import ACTIONS, case_id_for
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.outcomes import OutcomeStore
from negcase.store.queue import is_held_out
from negcase.store.sessions import SessionStore
from tests.conftest import worker_env
from tests.training_cases import add_cases, assert_conserved, detect, rule_cases, rule_trades


def trained(client: redis.Redis, settings: Settings) -> Trainer:
    """A trainer that drained the queue."""
    trainer = Trainer(client, settings, "t1", Archive(settings.data_dir))
    trainer.run(StopFlag(), burst=True)
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
