"""Training workers as real processes on a real Redis: trainers draining one queue together,
a trainer killed or paused mid-training, a case that always fails, a graceful stop, and the
lineage commands. Conservation is checked after each story."""

from __future__ import annotations

import math
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

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
from negcase.store.queue import CaseQueue, is_held_out
from negcase.store.sessions import SessionStore
from tests.conftest import run_burst, wait_until, worker_env
from tests.training_cases import (
    add_cases,
    assert_conserved,
    detect,
    held_out_trade,
    make_case,
    publish_constant_policy,
    random_features,
    redis_now_ms,
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
    outcomes = Counter(e["outcome"] for e in completed)
    assert outcomes["published"] + outcomes["rejected"] == len(trainable), outcomes
    assert outcomes["published"] >= 1
    # every published session is one version, each built on the one before
    lineage = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir)).list()
    assert [info.version for info in lineage] == list(range(1, outcomes["published"] + 1))
    assert [info.meta["parent_version"] for info in lineage] == [None, *range(1, len(lineage))]
    published = sorted(int(e["version"]) for e in completed if e["outcome"] == "published")
    assert published == [info.version for info in lineage]


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


def wait_for_publish_attempt(settings: Settings, timeout_s: float = 60) -> None:
    """Wait until a trainer tries to take the publish lock (held by the test). Called once
    its session started (a trainer also tries the lock when it starts): its training is
    over, and it will publish, or ack a refused update, as soon as it has the lock."""
    command = f"SET {settings.keys.publish_lock} "
    watcher = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        with watcher.monitor() as monitor:
            while time.monotonic() < deadline:
                if monitor.next_command()["command"].startswith(command):
                    return
    except redis.TimeoutError:
        pass
    pytest.fail(f"no trainer tried to take the publish lock within {timeout_s}s")


def pause_past_its_lease(
    client: redis.Redis, settings: Settings, process: subprocess.Popen[str], case_id: str
) -> None:
    """SIGSTOP the process, then wait until Redis's clock has passed its lease's deadline."""
    process.send_signal(signal.SIGSTOP)
    wait_until(lambda: process_state(process.pid) == "T", 20, "the process to stop")

    def lapsed() -> bool:
        deadline_ms = client.zscore(settings.keys.leased, case_id)
        return deadline_ms is not None and deadline_ms <= redis_now_ms(client)

    wait_until(lapsed, 20, "the paused trainer's lease to lapse")


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat: R, S, T (stopped) and so on."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def completed_by(client: redis.Redis, settings: Settings, trainer: str) -> list[dict[str, str]]:
    return [e for e in events(client, settings, "training_completed") if e["trainer"] == trainer]


def assert_it_lost_the_lease(client: redis.Redis, settings: Settings, trainer: str) -> None:
    """One session of `trainer`, announced once: closed by a reaper as abandoned (its
    deadline passed while it was stopped) or by itself; either way it recorded, resumed,
    that it lost the lease."""
    [completed] = completed_by(client, settings, trainer)
    assert completed["outcome"] in ("abandoned", "lease_lost"), completed
    session_id = completed["session_id"]
    wait_until(lambda: session_outcome(client, settings, session_id) == "lease_lost", 60)


def session_outcome(client: redis.Redis, settings: Settings, session_id: str) -> str | None:
    session = SessionStore(client, settings.keys, None).get(session_id)
    return None if session is None else session.outcome


def test_a_trainer_paused_past_its_lease_cannot_publish_and_its_case_dies_at_the_limit(
    client, settings, spawn
) -> None:
    # given a trainer allowed one attempt per case, done training and waiting for the
    # publish lock that the test holds
    case = make_case(1, [1.0] * 8, epochs=20)
    add_cases(client, settings, [case])
    lock = client.lock(settings.keys.publish_lock, timeout=120)
    assert lock.acquire(blocking=False)
    env = trainer_env(settings, 1.0, NEGCASE_MAX_ATTEMPTS="1")
    paused = spawn("train", "--burst", "--consumer", "paused", env=env)
    wait_training_started(client, settings)
    wait_for_publish_attempt(settings)

    # when it is paused past its lease (nobody else touches the case), then resumed with the
    # lock free
    pause_past_its_lease(client, settings, paused, case.case_id)
    lock.release()
    paused.send_signal(signal.SIGCONT)
    finish(paused)  # --burst: it ends once nothing is queued or leased

    # then it published nothing: its lease had lapsed (and its own upkeep thread, reaping
    # at once, usually took the case back first: fencing refused it either way)
    assert_it_lost_the_lease(client, settings, "paused")
    assert CheckpointRegistry(client, settings.keys).latest_version() is None
    assert events(client, settings, "checkpoint_published") == []
    # and the lease expired at the case's last attempt: it is dead, saying who held it
    counts = assert_conserved(client, settings)
    assert (counts["dead"], counts["done"]) == (1, 0)
    assert client.hget(settings.keys.dead, case.case_id) == b"lease expired (held by paused)"
    [dead] = events(client, settings, "case_dead")
    assert (dead["case_id"], dead["attempts"]) == (case.case_id, "1")


@pytest.mark.parametrize("refused_by_the_gate", [False, True], ids=["publish", "ack"])
def test_a_trainer_paused_past_its_lease_cannot_publish_or_ack_over_the_next_holder(
    client, settings, spawn, refused_by_the_gate
) -> None:
    # given a trainer done training and waiting for the publish lock that the test holds
    # (for "ack": v1 always holds and the validation window has a BUY that lost, so its
    # update, to always buy, trades worse than v1: the gate refuses it, and it goes to ack)
    case = make_case(1, [1.0] * 8, action="BUY", epochs=100)
    if refused_by_the_gate:
        publish_constant_policy(client, settings, "HOLD")
        detect(client, settings, [held_out_trade([1.0] * 8, "BUY", -0.02)])
    add_cases(client, settings, [case])
    published = CheckpointRegistry(client, settings.keys).latest_version()
    lock = client.lock(settings.keys.publish_lock, timeout=120)
    assert lock.acquire(blocking=False)
    paused = spawn("train", "--burst", "--consumer", "paused", env=trainer_env(settings, 1.0))
    wait_training_started(client, settings)
    wait_for_publish_attempt(settings)

    # when it is paused past its lease, and another worker reaps the case and leases it anew
    pause_past_its_lease(client, settings, paused, case.case_id)
    other = CaseQueue(client, settings.keys, lease_s=60)
    assert other.reap() == 1
    [taken] = other.claim("other")
    lock.release()
    paused.send_signal(signal.SIGCONT)
    wait_until(lambda: completed_by(client, settings, "paused"), 60, "the paused session closed")

    # then it neither published nor acked: its token is not the current one
    assert_it_lost_the_lease(client, settings, "paused")
    assert CheckpointRegistry(client, settings.keys).latest_version() == published
    assert client.hget(settings.keys.rejected, case.case_id) is None
    assert CaseStore(client, settings.keys).get(case.case_id).retraining_count == 0
    # and the new holder's lease is untouched: it can still extend and ack it
    assert client.zscore(settings.keys.leased, case.case_id) == taken.deadline_ms
    assert other.heartbeat([taken]) == []
    other.ack([taken])
    finish(paused)
    assert assert_conserved(client, settings)["leased"] == 0


def test_a_trainer_paused_mid_training_stops_when_its_heartbeat_finds_the_lease_gone(
    client, settings, spawn
) -> None:
    # given a trainer in a session (the warm start that makes v1) that would take minutes
    case = make_case(1, [1.0] * 8, epochs=ENDLESS_EPOCHS)
    add_cases(client, settings, [case])
    env = trainer_env(
        settings,
        1.0,
        NEGCASE_EARLY_STOP_PATIENCE="0",
        NEGCASE_WARM_START_EPOCHS=str(ENDLESS_EPOCHS),
    )
    paused = spawn("train", "--burst", "--consumer", "paused", env=env)
    wait_training_started(client, settings)

    # when it is paused past its lease, and another worker reaps the case and leases it anew
    pause_past_its_lease(client, settings, paused, case.case_id)
    other = CaseQueue(client, settings.keys, lease_s=60)
    assert other.reap() == 1
    [taken] = other.claim("other")
    paused.send_signal(signal.SIGCONT)

    # then its next heartbeat finds the lease gone and the session ends there, untrained
    wait_until(lambda: completed_by(client, settings, "paused"), 60, "the paused session closed")
    assert_it_lost_the_lease(client, settings, "paused")
    assert client.zscore(settings.keys.leased, case.case_id) == taken.deadline_ms
    other.ack([taken])
    finish(paused)
    assert events(client, settings, "checkpoint_published") == []


def test_cases_that_always_fail_end_dead_while_others_flow(client, settings, spawn) -> None:
    short = make_case(0, [1.0, 2.0, 3.0], priority=5)  # three features where the model takes 8
    not_finite = make_case(5, [1.0, math.nan, *[0.0] * 6], priority=5)  # stored before a check
    good = rule_cases(3, start=1, epochs=20)
    add_cases(client, settings, [short, not_finite, *good])

    finish(spawn("train", "--burst", env=trainer_env(settings, 5.0, NEGCASE_MAX_ATTEMPTS="3")))

    counts = assert_conserved(client, settings)
    assert (counts["dead"], counts["done"]) == (2, 3)
    assert b"expected 8 numbers, got 3" in client.hget(settings.keys.dead, short.case_id)
    assert b"not all finite numbers" in client.hget(settings.keys.dead, not_finite.case_id)
    dead = events(client, settings, "case_dead")
    assert sorted(e["case_id"] for e in dead) == [short.case_id, not_finite.case_id]
    assert {e["attempts"] for e in dead} == {"3"}


def test_a_stored_case_that_cannot_be_trained_is_failed_with_its_reason(client, settings) -> None:
    # given cases stored before the checks they fail: a NaN feature, the wrong feature count
    not_finite = make_case(5, [1.0, math.nan, *[0.0] * 6], priority=5)
    short = make_case(6, [1.0, 2.0, 3.0], priority=5)
    add_cases(client, settings, [not_finite, short])
    trainer = Trainer(client, settings.with_overrides(max_attempts=1), "t1", None)

    # when a trainer claims them, then it trains nothing and fails each with the reason
    assert trainer.train_claimed(trainer.queue.claim("t1", count=2), StopFlag()) is None
    dead = {k.decode(): v.decode() for k, v in client.hgetall(settings.keys.dead).items()}
    assert dead.keys() == {not_finite.case_id, short.case_id}
    assert dead[not_finite.case_id].startswith("features: not all finite numbers")
    assert dead[short.case_id] == "features: expected 8 numbers, got 3"
    assert CheckpointRegistry(client, settings.keys).latest_version() is None


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
    run_burst(Trainer(client, lenient, "t1", Archive(settings.data_dir)), timeout_s=120)
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
    outcomes = run_burst(trainer, timeout_s=120)

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
