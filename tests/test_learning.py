"""Learning, in-process on a real Redis: the model gets better on data it never saw, the
validation gate refuses a harmful update, and concurrent publishers both land (rebase)."""

from __future__ import annotations

import dataclasses
import random
import threading

import redis
import torch

from negcase.processes.model import ModelSpec, build_model, load_verified, state_of
from negcase.processes.publishing import publish_update
from negcase.processes.trainer import Trainer
from negcase.processes.training import Examples, Update, measure
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.case import ACTIONS
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.queue import is_held_out
from negcase.store.samples import sample_replay
from negcase.store.sessions import SessionStore
from tests.training_cases import add_cases, assert_conserved, rule_cases


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


def test_training_on_cases_learns_the_hidden_rule(client, settings) -> None:
    torch.set_num_threads(1)
    settings = settings.with_overrides(cases_per_claim=4, seed=0)
    # 160 cases: the id rule holds out about 16, never trained, for an honest gate
    add_cases(client, settings, rule_cases(160, seed=1, epochs=100))
    unseen = Examples.of(rule_cases(500, seed=99), settings.feature_count)
    torch.manual_seed(settings.seed)  # the weights every trainer starts from
    before = measure(build_model(ModelSpec(8, settings.hidden_sizes)), unseen)

    outcomes = trained(client, settings).outcomes

    after = measure(latest_model(client, settings), unseen)
    assert outcomes["published"] >= 3
    assert after.accuracy >= 0.65 and after.accuracy >= before.accuracy + 0.2, (before, after)
    assert after.loss < before.loss
    assert assert_conserved(client, settings)["done"] == 160


def test_the_gate_refuses_a_harmful_update_and_says_why(client, settings) -> None:
    torch.set_num_threads(1)
    settings = settings.with_overrides(cases_per_claim=8)
    good = rule_cases(40, seed=1, epochs=100)
    add_cases(client, settings, good)
    trained(client, settings)
    registry = CheckpointRegistry(client, settings.keys)
    published = registry.latest_version()
    # The same market situations, every label wrong, trained hard with nothing to replay.
    # (Only ids the rule trains: a flipped case held out would be a wrong-label judge.)
    flipped = [
        dataclasses.replace(
            case,
            case_id=f"nc-bad-{n:03d}",
            training_epochs=300,
            what_should_have_been_done=ACTIONS[(case.label + 1) % 3],
        )
        for n, case in enumerate(good)
        if not is_held_out(f"nc-bad-{n:03d}", settings.heldout_share)
    ]
    add_cases(client, settings, flipped)
    harmful = settings.with_overrides(cases_per_claim=40, replay_size=0, early_stop_patience=0)

    trainer = trained(client, harmful)

    assert trainer.outcomes == {"rejected": 1}
    assert registry.latest_version() == published
    counts = assert_conserved(client, settings)
    assert counts["done"] == 40 + len(flipped)
    assert counts["rejected"] >= len(flipped)
    reason = client.hget(settings.keys.rejected, "nc-bad-000").decode()
    assert reason.startswith("held-out loss rose")
    [completed] = [
        fields
        for _, fields in client.xrange(settings.keys.events)
        if fields[b"type"] == b"training_completed" and b"nc-bad-000" in fields[b"cases"]
    ]
    assert completed[b"outcome"] == b"rejected" and completed[b"rejected_reason"].decode() == reason
    # Trained is trained: the count moves in Redis and in the archive, published or not.
    [stored] = CaseStore(client, settings.keys).get_many(["nc-bad-000"])
    assert stored.retraining_count == 1 and stored.last_retrained_ms
    assert Archive(settings.data_dir).read_case("nc-bad-000").retraining_count == 1


def test_concurrent_publishers_both_land_through_rebase(client, settings) -> None:
    spec = ModelSpec(8, (4,))
    registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir))
    base = state_of(build_model(spec))
    meta = {"feature_count": 8, "model_spec": spec.to_dict(), "case_ids": []}
    no_heldout = Examples.of([], 8)
    first = publish_update(
        registry, Update(None, base, base), build_model(spec), 8, no_heldout, 0.02, meta
    )
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
                publish_update(registry, u, build_model(spec), 8, no_heldout, 0.02, meta)
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


def test_the_trainer_never_trains_the_cases_it_judges_models_on(client, settings) -> None:
    torch.set_num_threads(1)
    # given cases some of which the id rule holds out
    settings = settings.with_overrides(cases_per_claim=3, heldout_size=4)
    cases = rule_cases(30, seed=3, epochs=20)
    held_out = sorted(c.case_id for c in cases if is_held_out(c.case_id, settings.heldout_share))
    assert len(held_out) >= 2
    add_cases(client, settings, cases)

    # when a trainer drains the queue
    trainer = trained(client, settings)

    # then it measured on held-out cases only, and no session trained any of them
    judges = trainer.heldout.ids()
    assert judges and judges <= set(held_out)
    sessions = SessionStore(client, settings.keys, None).recent(100)
    trained_ids = {case_id for session in sessions for case_id in session.case_ids}
    assert trained_ids == {c.case_id for c in cases} - set(held_out)
    assert all(s.metrics["heldout_count"] == len(judges) for s in sessions if s.metrics)
    counts = assert_conserved(client, settings)
    assert (counts["done"], counts["held_out"]) == (30, len(held_out))


def test_replay_never_draws_held_out_or_rejected_cases(client, settings) -> None:
    # given done cases: some held out by the id rule, some the gate refused, the rest fine
    cases = rule_cases(60, seed=4)
    add_cases(client, settings, cases)
    ids = [case.case_id for case in cases]
    client.sadd(settings.keys.done, *ids)  # as the code before the held-out rule left them
    client.hset(settings.keys.rejected, mapping={i: "held-out loss rose" for i in ids[:10]})
    share = settings.heldout_share
    allowed = {i for i in ids[10:] if not is_held_out(i, share)}
    assert len(allowed) < 50

    # when a trainer draws a replay sample larger than what may be replayed
    replay = sample_replay(client, settings.keys, 100, set(), 8, random.Random(0), share)

    # then it holds exactly the trained, accepted cases
    assert {case.case_id for case in replay} == allowed


def test_one_seed_draws_the_same_replay_sample_from_the_same_cases(client, settings) -> None:
    # given done cases, as a backtest's trainer meets them
    cases = rule_cases(60, seed=5)
    add_cases(client, settings, cases)
    client.sadd(settings.keys.done, *(case.case_id for case in cases))

    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        replay = sample_replay(client, settings.keys, 8, set(), 8, rng, settings.heldout_share)
        return [case.case_id for case in replay]

    # when two trainers with one seed draw, then they draw the same cases in the same order
    assert draw(1) == draw(1)
    # and another seed draws others
    assert draw(1) != draw(2)
