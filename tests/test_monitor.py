"""`negcase status` and `negcase tail` on a real Redis, over state built by the real code:
the detector, the case queue, the checkpoint registry, a trainer, a reloader and an inference
worker, all in this process."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import orjson
import redis

from negcase.cli.status import gather_status
from negcase.cli.status_view import render_status
from negcase.cli.tail import format_event
from negcase.client.trades import publish_trades
from negcase.processes.detector import LossDetector
from negcase.processes.inference import InferenceWorker
from negcase.processes.model import sha256_hex, state_of, weights_bytes
from negcase.processes.reloader import Reloader
from negcase.processes.trainer import Trainer
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.case import case_id_for
from negcase.schemas.event import CATALOGUE as FORMATTERS
from negcase.schemas.event import EVENT_TYPES, Event
from negcase.schemas.session import TrainingSession
from negcase.schemas.signal import request_fields
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.health import HealthKey
from negcase.store.keys import DETECTOR_GROUP
from negcase.store.queue import CaseQueue
from negcase.store.serving import ServingControl
from tests.conftest import ROOT, run_burst
from tests.serving import (
    FEATURES,
    checkpoint_meta,
    seeded_model,
    serving_story,
    write_bad_checkpoint,
)
from tests.training_cases import claim_expired

# Exit prices of a BUY at 3000 whose loss (15, 6, 3, 1.5, 0.5 %) lands on each priority.
EXIT_BY_PRIORITY = {5: 2550, 4: 2820, 3: 2910, 2: 2955, 1: 2985}


def small(settings: Settings) -> Settings:
    """A model and an epoch count that train in well under a second."""
    return dataclasses.replace(settings, hidden_sizes=(8,), epoch_multiplier=0.05)


def trade(trade_id: str, exit_price: float, features: bool = True, **extra) -> dict:
    fields = {
        "trade_id": trade_id,
        "symbol": "ETH/USDT",
        "side": "BUY",
        "entry_price": 3000,
        "exit_price": exit_price,
        **extra,
    }
    return {**fields, "features": FEATURES} if features else fields


def detect(client: redis.Redis, settings: Settings, trades: list[dict]) -> None:
    """Publish trades and drain them with a real detector in burst mode."""
    publish_trades(client, settings.keys, trades, "flat")
    run_burst(LossDetector(client, settings, "detector-1", None))


def publish_checkpoint(client: redis.Redis, settings: Settings, seed: int, loss: float) -> int:
    """Publish a seeded model with the metrics a trainer records; its version."""
    registry = CheckpointRegistry(client, settings.keys)
    weights = weights_bytes(state_of(seeded_model(settings, seed)))
    metrics = {
        "heldout_before": {"loss": 0.7, "accuracy": 0.5},
        "heldout_after": {"loss": loss, "accuracy": 0.6},
        "epochs": 10,
    }
    meta = {**checkpoint_meta(settings), "case_ids": ["nc-a"], "metrics": metrics}
    return registry.publish(weights, sha256_hex(weights), meta, registry.latest_version())


def beat_elsewhere(settings: Settings, consumer: str, version: int) -> None:
    """An inference worker's health record, written by another process (its own pid)."""
    code = (
        "import sys; from negcase.store.connection import connect;"
        "from negcase.store.health import HealthKey;"
        "from negcase.store.keys import Keys; c = connect(sys.argv[1]);"
        "HealthKey(c, Keys(sys.argv[2]), 'inference', 30).refresh(consumer=sys.argv[3],"
        " version=int(sys.argv[4]))"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            settings.redis_url,
            settings.namespace,
            consumer,
            str(version),
        ],
        cwd=ROOT,
        check=True,
    )


def serve_requests(client: redis.Redis, settings: Settings, version: int) -> None:
    """An inference worker named w1 on `version` that answers three requests and dead-letters
    one without a request_id."""
    reloader = Reloader(client, settings, "w1")
    reloader.load(version)
    worker = InferenceWorker(client, settings, "w1", reloader)
    worker.store.ensure_group()
    for n in range(3):
        client.xadd(settings.keys.requests, request_fields(f"r-{n}", FEATURES))
    client.xadd(settings.keys.requests, {"features": orjson.dumps(FEATURES)})
    worker.handle(worker.store.read_new("w1", 10, None))
    # What the worker's loop writes on each turn, here once.
    worker.health.refresh(consumer="w1", version=version, signals=worker.totals.signals)


def test_status_answers_what_an_operator_asks_first(client, settings) -> None:
    settings = small(settings)
    keys = settings.keys
    # given a case at each priority, a featureless loss, a win and a malformed trade, detected
    detect(
        client,
        settings,
        [
            *(
                trade(f"p{p}", exit_price, model_version=1 if p in (5, 1) else None)
                for p, exit_price in EXIT_BY_PRIORITY.items()
            ),
            trade("bare", 2940, features=False),
            trade("win", 3030, model_version=1),
            {**trade("bad", 2970), "entry_price": 0},
        ],
    )
    # and a detector that died holding one entry, with one more not yet delivered
    publish_trades(client, keys, [trade("late-1", 2970), trade("late-2", 2970)], "flat")
    client.xreadgroup(DETECTOR_GROUP, "detector-dead", {keys.trades: ">"}, count=1)
    # and the queue in every state: rejected by the gate, dead, leased, expired, queued
    queue = CaseQueue(client, keys, lease_s=30, max_attempts=1)
    queue.ack(queue.claim("trainer-a"), rejected_reason="held-out loss rose 0.61 -> 0.70")
    queue.fail(queue.claim("trainer-a"), "CUDA out of memory", "trainer-a")
    queue.claim("trainer-a")
    claim_expired(client, keys, "trainer-b")
    # and two checkpoints, w1 serving v2 here and w-old still on v1 elsewhere
    assert publish_checkpoint(client, settings, 1, 0.65) == 1
    assert publish_checkpoint(client, settings, 2, 0.6) == 2
    serve_requests(client, settings, 2)
    client.xadd(keys.requests, request_fields("r-waiting", FEATURES))
    beat_elsewhere(settings, "w-old", 1)
    HealthKey(client, keys, "trainer", 30).refresh(name="trainer-a")

    # when an operator asks
    status = gather_status(client, keys)

    # then the queue adds up, by state and by priority, with the reasons for dead and rejected
    cases = status["cases"]
    assert {k: cases[k] for k in ("queued", "leased", "done", "dead", "rejected", "total")} == {
        "queued": 1,
        "leased": 2,
        "done": 1,
        "dead": 1,
        "rejected": 1,
        "total": 5,
    }
    assert cases["conserved"] and cases["without_features"] == 1
    assert cases["queued_by_priority"] == {"5": 0, "4": 0, "3": 0, "2": 0, "1": 1}
    assert cases["rejected_reasons"] == {case_id_for("p5"): "held-out loss rose 0.61 -> 0.70"}
    assert cases["dead_reasons"] == {case_id_for("p4"): "CUDA out of memory"}
    # and the leases by deadline: the expired one first, waiting for the reaper
    expired, live = status["leases"]
    assert (expired["case_id"], expired["worker"], expired["priority"]) == (
        case_id_for("p2"),
        "trainer-b",
        2,
    )
    assert expired["expired"] and expired["deadline_in_s"] <= 0
    assert (live["case_id"], live["worker"], live["attempts"]) == (
        case_id_for("p3"),
        "trainer-a",
        0,
    )
    assert not live["expired"] and 25 < live["deadline_in_s"] <= 30
    # and each consumer group's backlog, with the latest dead letters
    trades, signals = status["trades"], status["signals"]
    assert (trades["pending"], trades["lag"], trades["consumers"]) == (1, 1, 2)
    assert trades["oldest_pending_idle_ms"] >= 0 and trades["dead_letters"] == 1
    assert trades["latest_dead_reasons"] == ["entry_price: must be > 0, got 0"]
    assert (signals["stream_length"], signals["pending"], signals["lag"]) == (1, 0, 1)
    assert signals["oldest_pending_idle_ms"] is None
    assert signals["latest_dead_reasons"] == ["request_id: required"]
    # and the checkpoints with lineage and metrics, and who serves which
    assert status["latest_checkpoint"] == 2
    v2, v1 = status["checkpoints"]
    assert (v2["version"], v2["parent_version"], v1["parent_version"]) == (2, 1, None)
    assert v2["metrics"]["heldout_after"] == {"loss": 0.6, "accuracy": 0.6}
    assert status["serving"] == {"2": ["w1"], "1": ["w-old"]}
    assert status["workers_alive"] == {"inference": 2, "trainer": 1}
    # and the loss rate and signals per model version
    v1_row = status["models"]["1"]
    assert (v1_row["trades"], v1_row["losses"], v1_row["loss_rate"]) == (3, 2, 0.6667)
    assert v1_row["mean_loss_pct"] == 7.75 and status["models"]["2"]["signals"] == 3

    # and the text says the same, one section per question
    text = render_status(status)
    assert "cases  5 trainable = 1 queued + 2 leased + 1 done + 1 dead  (conserved)" in text
    assert "expired, waiting for the reaper" in text and "CUDA out of memory" in text
    assert "latest dead signals: request_id: required" in text
    assert "0.700 -> 0.600" in text and "per model version" in text
    assert "workers alive  inference 2 | trainer 1" in text


def test_status_of_a_namespace_nothing_has_touched(client, settings) -> None:
    # given no stream, no group, no case and no worker
    status = gather_status(client, settings.keys)
    # then status reads zeros and nones, and renders them
    assert status["trades"]["lag"] is None and status["signals"]["consumers"] == 0
    assert status["cases"]["total"] == 0 and status["cases"]["conserved"]
    assert status["leases"] == [] and status["serving"] == {} and status["models"] == {}
    assert "leases  none held" in render_status(status)


def test_tail_has_a_readable_line_for_every_event_type(client, settings) -> None:
    settings = small(settings)
    keys = settings.keys
    # given cases, a dead letter, a trained and published case, and a rollback
    detect(
        client,
        settings,
        [
            trade("big", 2550),
            trade("mid", 2910),
            trade("small", 2985),
            trade("bare", 2940, features=False),
            {**trade("bad", 2970), "entry_price": 0},
        ],
    )
    trainer = Trainer(client, settings, "t1", None)
    trainer.train_claimed(trainer.queue.claim("t1"), StopFlag())
    registry = CheckpointRegistry(client, keys)
    second = publish_checkpoint(client, settings, 2, 0.6)
    ServingControl(client, settings).step()  # as a worker does: it serves at once
    registry.rollback(1)
    # and canaries judged by their live figures: one retired, one promoted then rolled back
    service, retired, rolled_back = serving_story(client, settings)
    # and a reloader that loads v1, then refuses a checkpoint with the wrong sha256
    reloader = Reloader(client, settings, "w1")
    reloader.load(1)
    bad = write_bad_checkpoint(client, settings, "wrong_sha256")
    reloader.load(bad)
    # and a case that fails for good, and one whose lease expires on its last attempt
    dying = CaseQueue(client, keys, lease_s=30, max_attempts=1)
    dying.fail(dying.claim("t2"), "CUDA out of memory", "t2")
    claim_expired(client, keys, "t3")
    dying.reap()

    # when tail formats what the workers wrote
    events = [Event.from_fields(fields) for _, fields in client.xrange(keys.events)]
    lines: dict[str, list[str]] = {}
    for event in events:
        lines.setdefault(event.type, []).append(format_event(event))

    # then every type was written, has its own formatter, and reads as the worker meant
    assert set(lines) == set(FORMATTERS) == set(EVENT_TYPES)
    big, mid, small_loss = case_id_for("big"), case_id_for("mid"), case_id_for("small")
    assert any(
        f"NEGATIVE CASE ADDED: {big} | ETH/USDT BUY | Loss: $450.00 (15.0%) | Priority: 5 | "
        "Should have: SELL | Epochs: 25" in line
        for line in lines["case_added"]
    )
    assert any("no features: archived, not queued" in line for line in lines["case_added"])
    assert "trade bad | entry_price: must be > 0, got 0" in lines["dead_lettered"][0]
    assert (
        f"INTENSIVE TRAINING STARTED: t1 | Cases: {big} | Epochs: 25 | Base: none"
        in lines["training_started"][0]
    )
    [completed] = lines["training_completed"]
    assert "INTENSIVE TRAINING COMPLETED: Epochs: " in completed
    assert "Published: v1 | t1 in " in completed
    published = lines["checkpoint_published"]
    assert "CHECKPOINT PUBLISHED: v1 (parent none) | by t1 | sha256 " in published[0]
    assert f"CHECKPOINT PUBLISHED: v{second} (parent v1)" in published[1]
    assert (
        f"ROLLBACK: v1 in service again (was v{second}) | operator | sha256 "
        in (lines["rollback"][0])
    )
    s = f"v{service}"
    started = f"CANARY STARTED: v{retired} answers 25% of signal requests | in service: {s}"
    assert started in lines["canary_started"][0]
    [retire] = lines["retired"]
    assert f"RETIRED: canary v{retired} | worse than {s} in service | mean P&L -1.500%" in retire
    assert f"against {s}'s +1.500% over 2 (0.0%) | z -4.24, threshold -1.65 | {s} stays" in retire
    promoted = f"PROMOTED: v{rolled_back} in service (was {s}) | not worse than {s}"
    assert promoted in lines["promoted"][-1]
    rolled = f"ROLLBACK: {s} in service again (was v{rolled_back}) | worse than {s} before it"
    assert rolled in lines["rollback"][1]
    [deferred] = lines["deferred"]
    assert (
        f"DEFERRED: {s} in service answers with no opinion, the engine keeps its own rule | "
        "worse than the engine's own rule on the same decisions | mean P&L -0.500% per "
        "decision against the rule's +1.000% over the same 2 | z -3.00, threshold -1.65"
    ) in deferred
    assert (
        "CHECKPOINT LOADED: v1 on w1 (was serving none) | Reload: " in lines["checkpoint_loaded"][0]
    )
    [rejected] = lines["checkpoint_rejected"]
    assert f"CHECKPOINT REJECTED: v{bad} on w1 | " in rejected and "sha256" in rejected
    assert rejected.endswith("| still serving v1")
    assert f"LEASE EXPIRED: {small_loss} | held by t3 | Attempts: 1" in lines["lease_expired"][0]
    failed, expired = lines["case_dead"]
    assert f"CASE DEAD: {mid} | Attempts: 1 | by t2 | Last error: CUDA out of memory" in failed
    assert (
        f"CASE DEAD: {small_loss} | Attempts: 1 | Last error: lease expired (held by t3)" in expired
    )


def test_an_unknown_event_type_gets_the_generic_line() -> None:
    # given an event type a newer worker writes, which this tail does not know
    event = Event("model_drifted", 0, {"version": "4", "psi": "0.31"})
    # then it still reads as one line with its details
    assert format_event(event).endswith("MODEL DRIFTED: version: 4 | psi: 0.31")


def test_a_session_that_did_not_publish_never_reads_as_completed() -> None:
    # given sessions that ended each way
    def ended(outcome: str, **more) -> str:
        session = TrainingSession("s-1", "t1", 0, ["nc-a"], None, 200, outcome=outcome, **more)
        session.epochs_completed = 0 if outcome == "interrupted" else 200
        event = Event(
            "training_completed",
            0,
            {
                "outcome": outcome,
                "summary": session.summary(),
                "trainer": "t1",
                "duration_s": 1.5,
                **more,
            },
        )
        return format_event(event)

    # then only a published one says COMPLETED, and each says how it ended
    assert "INTENSIVE TRAINING COMPLETED: Epochs: 200 of 200" in ended("published")
    rejected = ended("rejected", rejected_reason="held-out loss rose")
    assert "COMPLETED" not in rejected
    assert "TRAINING REJECTED BY THE GATE" in rejected and "held-out loss rose" in rejected
    interrupted = ended("interrupted")
    assert "COMPLETED" not in interrupted
    assert "TRAINING INTERRUPTED: Epochs: 0 of 200" in interrupted
    assert "handed back to the queue" in interrupted
    assert "TRAINING FAILED" in ended("failed", error="boom")
