"""Training workers as real processes on a real Redis: trainers draining one queue together,
a trainer killed or paused mid-training, a case that always fails, a graceful stop, and the
lineage commands. Conservation is checked after each story."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter

import orjson
import pytest
import redis

from negcase.client.predictor import Predictor
from negcase.client.trades import publish_trades
from negcase.processes.trainer import Trainer
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.queue import is_held_out
from negcase.store.sessions import SessionStore
from tests.conftest import wait_until, worker_env
from tests.training_cases import (
    add_cases,
    assert_conserved,
    make_case,
    random_features,
    rule_cases,
    rule_trades,
)

pytestmark = pytest.mark.slow

# A case that takes minutes when early stopping is off: the trainer is surely mid-training.
ENDLESS_EPOCHS = 10_000_000


def trainer_env(settings: Settings, lease_s: float, **extra: str) -> dict[str, str]:
    return worker_env(
        settings,
        NEGCASE_LEASE_S=str(lease_s),
        # These stories queue cases directly, with no outcomes: train on them at once, and
        # keep every version so that a lineage can be read whole.
        NEGCASE_MIN_OUTCOMES="0",
        NEGCASE_KEEP_CHECKPOINTS="100",
        **extra,
    )


def events(client: redis.Redis, settings: Settings, kind: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in client.xrange(settings.keys.events)
        if fields[b"type"] == kind.encode()
    ]


def finish(process: subprocess.Popen[str], timeout_s: float = 90) -> str:
    """Wait for a process to exit 0; its stderr."""
    _, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err
    return err


def wait_training_started(client: redis.Redis, settings: Settings) -> None:
    wait_until(lambda: events(client, settings, "training_started"), 60, "training_started")


@pytest.mark.parametrize("trainers", [2, 4])
def test_trainers_drain_the_queue_each_case_claimed_once(client, settings, spawn, trainers) -> None:
    cases = rule_cases(12, epochs=30)
    add_cases(client, settings, cases)
    env = trainer_env(settings, lease_s=20)

    processes = [spawn("train", "--burst", "--consumer", f"t{i}", env=env) for i in range(trainers)]
    for process in processes:
        finish(process)

    held_out = [c.case_id for c in cases if is_held_out(c.case_id, settings.heldout_share)]
    trainable = sorted(c.case_id for c in cases if c.case_id not in held_out)
    assert held_out  # nc-test-00004: done, never leased nor trained
    counts = assert_conserved(client, settings)
    assert (counts["done"], counts["held_out"]) == (12, len(held_out))
    # One fencing token per case trained: no case was ever claimed twice, so never held twice.
    assert int(client.get(settings.keys.fencing)) == len(trainable)
    completed = events(client, settings, "training_completed")
    assert sorted(e["cases"] for e in completed) == trainable
    assert {e["outcome"] for e in completed} <= {"published", "rejected"}
    lineage = CheckpointRegistry(client, settings.keys).list()
    assert [info.version for info in lineage] == list(range(1, len(lineage) + 1))
    assert [info.meta["parent_version"] for info in lineage] == [None, *range(1, len(lineage))]


def test_a_killed_trainers_case_is_reclaimed_after_its_lease(client, settings, spawn) -> None:
    add_cases(client, settings, [make_case(1, [1.0] * 8, epochs=ENDLESS_EPOCHS)])
    victim = spawn(
        "train",
        "--consumer",
        "victim",
        env=trainer_env(
            settings,
            1.0,
            NEGCASE_EARLY_STOP_PATIENCE="0",
            NEGCASE_WARM_START_EPOCHS=str(ENDLESS_EPOCHS),
        ),
    )
    wait_training_started(client, settings)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()

    finish(spawn("train", "--burst", "--consumer", "rescuer", env=trainer_env(settings, 1.0)))

    assert assert_conserved(client, settings)["done"] == 1
    assert [e["worker"] for e in events(client, settings, "lease_expired")] == ["victim"]
    # The killed trainer's session is closed for it, once; the rescuer's ends as usual.
    closed = {e["trainer"]: e for e in events(client, settings, "training_completed")}
    assert closed.keys() == {"victim", "rescuer"}
    assert closed["victim"]["outcome"] == "abandoned"
    assert closed["rescuer"]["outcome"] in ("published", "rejected")
    assert client.zcard(settings.keys.open_sessions) == 0


def test_a_trainer_paused_past_its_lease_can_neither_publish_nor_ack(
    client, settings, spawn
) -> None:
    add_cases(client, settings, [make_case(1, [1.0] * 8, epochs=ENDLESS_EPOCHS)])
    paused = spawn(
        "train",
        "--consumer",
        "paused",
        env=trainer_env(
            settings,
            1.0,
            NEGCASE_EARLY_STOP_PATIENCE="0",
            NEGCASE_WARM_START_EPOCHS=str(ENDLESS_EPOCHS),
        ),
    )
    wait_training_started(client, settings)
    paused.send_signal(signal.SIGSTOP)
    time.sleep(2.5)  # well past the 1 s lease

    finish(spawn("train", "--burst", "--consumer", "other", env=trainer_env(settings, 1.0)))
    paused.send_signal(signal.SIGCONT)
    wait_until(
        lambda: any(
            e["trainer"] == "paused" for e in events(client, settings, "training_completed")
        ),
        60,
        "the resumed trainer to notice it lost its lease",
    )
    paused.send_signal(signal.SIGTERM)
    finish(paused)

    completed = events(client, settings, "training_completed")
    outcomes = {e["trainer"]: e["outcome"] for e in completed}
    # Paused past its lease it stopped beating: a reaper closed its session, once; resumed,
    # it recorded what it knows (it lost the lease) without announcing the session again.
    assert outcomes["paused"] == "abandoned"
    assert [e["trainer"] for e in completed].count("paused") == 1
    [session_id] = [e["session_id"] for e in completed if e["trainer"] == "paused"]
    assert SessionStore(client, settings.keys, None).get(session_id).outcome == "lease_lost"
    assert outcomes["other"] in ("published", "rejected")
    trainers = {e["trainer"] for e in events(client, settings, "checkpoint_published")}
    assert trainers <= {"other"}
    assert assert_conserved(client, settings)["done"] == 1


def test_a_case_that_always_fails_ends_dead_while_others_flow(client, settings, spawn) -> None:
    bad = make_case(0, [1.0, 2.0, 3.0], priority=5)  # three features where the model takes 8
    good = rule_cases(3, start=1, epochs=20)
    add_cases(client, settings, [bad, *good])

    finish(spawn("train", "--burst", env=trainer_env(settings, 5.0, NEGCASE_MAX_ATTEMPTS="3")))

    counts = assert_conserved(client, settings)
    assert (counts["dead"], counts["done"]) == (1, 3)
    assert b"expected 8 numbers, got 3" in client.hget(settings.keys.dead, bad.case_id)
    assert [e["case_id"] for e in events(client, settings, "case_dead")] == [bad.case_id]


def test_sigterm_hands_the_case_back_without_counting_an_attempt(client, settings, spawn) -> None:
    case = make_case(1, [1.0] * 8, epochs=ENDLESS_EPOCHS)
    add_cases(client, settings, [case])
    trainer = spawn(
        "train",
        env=trainer_env(
            settings,
            5.0,
            NEGCASE_EARLY_STOP_PATIENCE="0",
            NEGCASE_WARM_START_EPOCHS=str(ENDLESS_EPOCHS),
        ),
    )
    wait_training_started(client, settings)

    trainer.send_signal(signal.SIGTERM)
    finish(trainer)

    assert assert_conserved(client, settings)["queued"] == 1
    assert client.hget(settings.keys.attempts, case.case_id) is None
    [completed] = events(client, settings, "training_completed")
    assert completed["outcome"] == "interrupted"


def test_retrain_all_from_archive_restores_and_queues_every_case(client, settings, spawn) -> None:
    cases = rule_cases(5)
    folder = settings.data_dir.parent / "old-archive"
    archive = Archive(folder)
    archive.add_cases(cases, [case.to_msgpack() for case in cases])

    finish(spawn("retrain-all", "--from-archive", str(folder)))

    counts = assert_conserved(client, settings)
    assert (counts["queued"], counts["total"]) == (5, 5)


def test_rollback_and_checkpoints_commands(client, settings, spawn) -> None:
    add_cases(client, settings, rule_cases(2, epochs=20))
    # no outcomes, so no validation window: nothing to judge by, both publish
    lenient = settings.with_overrides(min_outcomes=0)
    Trainer(client, lenient, "t1", Archive(settings.data_dir)).run(StopFlag(), burst=True)
    registry = CheckpointRegistry(client, settings.keys)
    assert registry.latest_version() == 2

    finish(spawn("rollback", "1"))
    listing = spawn("checkpoints")
    out, _ = listing.communicate(timeout=60)

    assert registry.latest_version() == 1
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["*", "1", "-"]
    assert lines[2].split()[:2] == ["2", "1"]
    # each publish was put in service by the trainer's serving step (no canary here)
    kinds = [fields[b"kind"] for _, fields in client.xrange(settings.keys.checkpoints)]
    assert kinds == [b"published", b"promoted", b"published", b"promoted", b"rollback"]


def trainer_health(client: redis.Redis, settings: Settings) -> dict | None:
    for key in client.scan_iter(settings.keys.health("trainer:*")):
        raw = client.get(key)
        if raw is not None:
            return orjson.loads(raw)
    return None


def test_a_trainer_busy_longer_than_its_health_ttl_stays_healthy(client, settings, spawn) -> None:
    # given a trainer in a session that outlasts its 2 s health TTL many times over
    add_cases(client, settings, [make_case(1, [1.0] * 8, epochs=ENDLESS_EPOCHS)])
    trainer = spawn(
        "train",
        "--consumer",
        "busy",
        env=trainer_env(
            settings,
            30.0,
            NEGCASE_EARLY_STOP_PATIENCE="0",
            NEGCASE_WARM_START_EPOCHS=str(ENDLESS_EPOCHS),
            NEGCASE_HEALTH_TTL_S="2",
        ),
    )
    wait_training_started(client, settings)
    [started] = events(client, settings, "training_started")

    # when its health TTL has passed since the session started
    def refreshed_mid_session() -> bool:  # by the heartbeat thread: the loop is busy training
        health = trainer_health(client, settings)
        return health is not None and health["at_ms"] > int(started["at_ms"]) + 2_000

    wait_until(refreshed_mid_session, 30, "a health refresh during the session")

    # then `negcase health` finds it alive, still in the same session
    health = spawn("health", "--kind", "trainer", "--json")
    out, err = health.communicate(timeout=60)
    assert health.returncode == 0, err
    assert orjson.loads(out)["workers"][0]["name"] == "busy"
    assert not events(client, settings, "training_completed")
    trainer.send_signal(signal.SIGTERM)
    finish(trainer)
    assert assert_conserved(client, settings)["queued"] == 1


def test_a_redis_socket_timeout_is_waited_out_like_a_lost_connection(
    client, settings, redis_url
) -> None:
    # given a trainer whose client gives up on a silent socket after 0.2 s, and cases to train
    add_cases(client, settings, rule_cases(3, epochs=20))
    impatient = redis.Redis.from_url(redis_url, socket_timeout=0.2)
    eager = settings.with_overrides(min_outcomes=0)
    trainer = Trainer(impatient, eager, "t1", Archive(settings.data_dir))

    # when Redis stops answering for a while (every client paused) as the trainer starts
    client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    outcomes = trainer.run(StopFlag(), burst=True)

    # then it backed off and, once Redis answered again, trained every case
    assert sum(outcomes.values()) == 3
    assert assert_conserved(client, settings)["done"] == 3


def test_one_losing_trade_labelled_hold_cannot_stop_learning(client, settings, spawn) -> None:
    """The HOLD dead end: a first model trained on one loss labelled HOLD answered HOLD to
    every input, the engine following it never traded again, and learning stopped for good.
    Given that one loss (a move too small to pay at leverage 10), when a detector and a
    trainer run, then no checkpoint is made from it: the engine keeps its own rule. And once
    enough decisions (skips included) have been reported, the first model is a model of the
    market: it does not answer HOLD to everything."""
    env = worker_env(settings, NEGCASE_MIN_OUTCOMES="60")
    one = {
        "trade_id": "fx-1",
        "symbol": "EUR/USD",
        "side": "BUY",
        "entry_price": 1.07219,
        "exit_price": 1.07159,
        "leverage": 10,
        "fee_rate": 0.0002,
        "features": [0.1] * 8,
    }
    publish_trades(client, settings.keys, [one])
    finish(spawn("detect", "--burst", env=env))
    [case_id] = [i.decode() for i in client.smembers(settings.keys.cases)]
    assert CaseStore(client, settings.keys).get(case_id).what_should_have_been_done == "HOLD"
    finish(spawn("train", "--burst", env=env))
    assert CheckpointRegistry(client, settings.keys).latest_version() is None

    publish_trades(client, settings.keys, rule_trades(100, seed=7))
    finish(spawn("detect", "--burst", env=env))
    finish(spawn("train", "--burst", "--batch-size", "16", env=env), timeout_s=240)

    rng = random.Random(0)
    with Predictor(client, settings) as predictor:
        answers = Counter(predictor.predict(random_features(rng)).action for _ in range(1000))
    assert answers["HOLD"] < 1000, answers
    assert answers["BUY"] > 0 and answers["SELL"] > 0, answers
