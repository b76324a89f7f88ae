"""Hot reload in real worker processes: publishes under load, bad checkpoints, late start,
rollback, and a dropped Redis connection."""

from __future__ import annotations

from collections import defaultdict

import orjson
import pytest

from negcase.client.signal_client import SignalClient
from negcase.processes.model import sha256_hex, state_of, weights_bytes
from negcase.store.checkpoints import CheckpointRegistry
from tests.conftest import wait_until
from tests.serving import (
    BAD_KINDS,
    FEATURES,
    Load,
    checkpoint_meta,
    events_of,
    publish,
    seeded_model,
    write_bad_checkpoint,
)

pytestmark = pytest.mark.slow


def serving_version(client, settings) -> int:
    return SignalClient(client, settings.namespace).request(FEATURES, timeout_s=30).model_version


def test_twenty_quick_publishes_under_load_lose_no_request(client, settings, spawn):
    # given two workers answering a steady load, serving version 1
    published = {publish(client, settings, seed=1)}
    spawn("serve", "--consumer", "w1")
    spawn("serve", "--consumer", "w2")
    with Load(settings) as load:
        wait_until(lambda: {s.worker for s in load.signals} == {"w1", "w2"}, 60, "both workers")
        # when 20 checkpoints are published in quick succession
        for seed in range(2, 22):
            published.add(publish(client, settings, seed=seed))
        final = max(published)
        wait_until(
            lambda: (
                {s.worker for s in load.signals[-50:] if s.model_version == final} == {"w1", "w2"}
            ),
            60,
            "both workers to serve the last version",
        )
    # then no request failed or timed out, and every reply names a published version
    assert load.failures == []
    assert {s.model_version for s in load.signals} <= published
    # and each batch used one version, and no worker's versions went backwards
    by_batch = defaultdict(set)
    by_worker = defaultdict(list)
    for s in load.signals:
        by_batch[s.worker, s.batch].add(s.model_version)
        by_worker[s.worker].append((s.batch, s.model_version))
    assert all(len(versions) == 1 for versions in by_batch.values())
    for answered in by_worker.values():
        versions = [version for _, version in sorted(answered)]
        assert versions == sorted(versions)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_checkpoint_is_refused_and_the_old_model_keeps_serving(client, settings, spawn, kind):
    # given a worker serving version 1
    publish(client, settings, seed=1)
    spawn("serve", "--consumer", "w1")
    assert serving_version(client, settings) == 1
    # when a bad checkpoint is written into Redis and announced
    bad = write_bad_checkpoint(client, settings, kind)
    # then the worker refuses it with an event naming the worker and version
    wait_until(lambda: events_of(client, settings, "checkpoint_rejected"), 30, "the refusal")
    (rejected,) = events_of(client, settings, "checkpoint_rejected")
    assert rejected.details["worker"] == "w1"
    assert rejected.details["version"] == str(bad)
    assert rejected.details["serving_version"] == "1"
    assert rejected.details["reason"]
    # and version 1 keeps answering, until a good checkpoint follows
    assert serving_version(client, settings) == 1
    good = publish(client, settings, seed=2)
    wait_until(lambda: serving_version(client, settings) == good, 30, "the good version")


def test_a_worker_started_after_several_publishes_serves_the_latest(client, settings, spawn):
    # given three publishes before any worker runs
    for seed in (1, 2, 3):
        latest = publish(client, settings, seed=seed)
    # when a worker starts, then its very first reply comes from the latest version
    spawn("serve", "--consumer", "late")
    assert serving_version(client, settings) == latest
    (loaded,) = events_of(client, settings, "checkpoint_loaded")
    assert loaded.details["worker"] == "late"
    assert loaded.details["version"] == str(latest)
    assert "serving_version" not in loaded.details  # its first model: none before it


def test_after_a_rollback_workers_move_back_to_that_version(client, settings, spawn):
    # given a worker serving version 3
    for seed in (1, 2, 3):
        publish(client, settings, seed=seed)
    spawn("serve")
    assert serving_version(client, settings) == 3
    # when `latest` is rolled back to version 1
    CheckpointRegistry(client, settings.keys).rollback(1)
    # then the worker serves version 1 again, and moves on with the next publish
    wait_until(lambda: serving_version(client, settings) == 1, 30, "the rollback")
    next_version = publish(client, settings, seed=4)
    wait_until(lambda: serving_version(client, settings) == next_version, 30, "the next publish")


def test_a_killed_connection_recovers_and_catches_up_with_latest(client, settings, spawn):
    # given a worker serving version 1
    publish(client, settings, seed=1)
    spawn("serve", "--consumer", "w1")
    assert serving_version(client, settings) == 1
    # when a newer checkpoint is stored and `latest` moves without an announcement (as if
    # the worker missed it), and every worker connection is killed
    keys = settings.keys
    weights = weights_bytes(state_of(seeded_model(settings, 2)))
    missed = int(client.incr(keys.version_counter))
    client.hset(
        keys.checkpoint(missed),
        mapping={
            "weights": weights,
            "sha256": sha256_hex(weights),
            "meta": orjson.dumps(checkpoint_meta(settings)),
        },
    )
    client.set(keys.latest, missed)
    killed = client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 2  # the serving connection and the reloader's
    # then the worker reconnects, reads `latest`, and serves the version it was not told of
    wait_until(lambda: serving_version(client, settings) == missed, 60, "the missed version")
