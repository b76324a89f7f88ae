"""The embedded Predictor: follows checkpoints like a worker, predicts with no round trip."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from negcase.client.predictor import NoModelYet, Predictor
from negcase.processes.model import (
    CheckpointError,
    ModelSpec,
    build_model,
    sha256_hex,
    state_of,
    weights_bytes,
)
from negcase.processes.reloader import Reloader
from negcase.runtime.settings import Settings
from negcase.schemas.signal import SignalRequestError
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry
from tests.conftest import wait_until
from tests.serving import (
    FEATURES,
    checkpoint_meta,
    events_of,
    local_probabilities,
    publish,
    seeded_model,
    stored_model,
    write_bad_checkpoint,
    write_checkpoint,
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Short blocking reads: closing a Predictor waits for the one in flight."""
    return settings.with_overrides(block_ms=100)


def test_predictions_follow_each_publish_and_match_a_local_forward_pass(client, settings):
    # given a predictor started before any checkpoint exists
    with Predictor(client, settings, name="engine-1") as predictor:
        with pytest.raises(NoModelYet):
            predictor.predict(FEATURES)
        # when two versions are published one after the other
        for seed in (1, 2):
            version = publish(client, settings, seed=seed)
            wait_until(lambda v=version: predictor.version == v, 30, f"version {version}")
            # then its predictions are that version's forward pass, lists and arrays alike
            expected = local_probabilities(stored_model(client, settings, version), FEATURES)
            for features in (FEATURES, np.array(FEATURES)):
                signal = predictor.predict(features)
                got = [signal.probabilities[a] for a in ("BUY", "SELL", "HOLD")]
                assert got == pytest.approx(expected, abs=1e-6)
                assert signal.model_version == version
    loaded = events_of(client, settings, "checkpoint_loaded")
    assert [(e.details["worker"], e.details["version"]) for e in loaded] == [
        ("engine-1", "1"),
        ("engine-1", "2"),
    ]


def test_a_bad_checkpoint_is_refused_and_predictions_go_on(client, settings):
    # given a predictor on version 1
    publish(client, settings, seed=1)
    with Predictor(client, settings, name="engine-1") as predictor:
        assert predictor.version == 1
        # when a checkpoint with NaN weights is announced
        bad = write_bad_checkpoint(client, settings, "nan_weights")
        wait_until(lambda: events_of(client, settings, "checkpoint_rejected"), 30, "the refusal")
        # then it is refused by name, and version 1 keeps predicting
        (rejected,) = events_of(client, settings, "checkpoint_rejected")
        assert (rejected.details["worker"], rejected.details["version"]) == ("engine-1", str(bad))
        assert "NaN" in rejected.details["reason"]
        assert predictor.predict(FEATURES).model_version == 1


@pytest.mark.parametrize(
    ("features", "field"),
    [
        (FEATURES[:7], "features"),
        ([*FEATURES[:2], float("nan"), *FEATURES[3:]], "features[2]"),
        (np.array(FEATURES[:7]), "features"),
        (np.array([*FEATURES[:5], np.inf, *FEATURES[6:]]), "features[5]"),
        (np.array([*FEATURES[:7], 1e300]), "features[7]"),
    ],
)
def test_bad_features_are_refused_by_name(client, settings, features, field):
    publish(client, settings, seed=1)
    with Predictor(client, settings) as predictor, pytest.raises(SignalRequestError) as caught:
        predictor.predict(features)
    assert caught.value.field == field


def rejections(client, settings) -> list[str]:
    return [e.details["reason"] for e in events_of(client, settings, "checkpoint_rejected")]


@pytest.mark.parametrize(
    ("spec_change", "matching_weights"),
    [
        ({"hidden_sizes": [-1]}, False),
        ({"hidden_sizes": [100_000, 100_000]}, False),  # ~40 GB, if it were ever built
        ({"hidden_sizes": [32]}, True),  # a whole, valid checkpoint of another network
        ({"factory": "tests.serving:small_mlp"}, False),
        ({"feature_count": 4}, False),
    ],
)
def test_a_checkpoint_for_another_model_spec_is_refused_and_the_old_one_serves(
    client, settings, spec_change, matching_weights
):
    # given a reloader serving version 1
    publish(client, settings, seed=1)
    reloader = Reloader(client, settings, "w1")
    reloader.sync()
    # when a checkpoint's metadata names a model this worker was not configured with
    meta = checkpoint_meta(settings)
    meta["model_spec"].update(spec_change)
    model = seeded_model(settings, 2)
    if matching_weights:
        model = build_model(ModelSpec.from_dict(meta["model_spec"]))
    bad = write_checkpoint(client, settings, weights_bytes(state_of(model)), meta)
    # then it is refused, by version and naming the spec, and version 1 keeps serving
    assert reloader.load(bad) is None
    assert reloader.live.version == 1 and bad in reloader.rejected
    (reason,) = rejections(client, settings)
    assert reason.startswith(f"v{bad}: model_spec")


@pytest.mark.parametrize("meta_change", [{"model_spec": "64,64"}, {"model_spec": None}, {}])
def test_a_checkpoint_without_a_usable_model_spec_is_refused(client, settings, meta_change):
    meta = {"feature_count": settings.feature_count, "trainer": "t", **meta_change}
    weights = weights_bytes(state_of(seeded_model(settings, 1)))
    bad = write_checkpoint(client, settings, weights, meta)
    reloader = Reloader(client, settings, "w1")
    assert reloader.load(bad) is None
    assert "model_spec unusable" in rejections(client, settings)[0]


def test_a_checkpoint_that_fails_to_build_is_refused_once_not_retried_forever(client, settings):
    # given a deployment whose model factory raises, and a checkpoint that names it
    settings = settings.with_overrides(model_factory="tests.serving:broken_factory")
    weights = weights_bytes(state_of(seeded_model(Settings(), 1)))
    bad = write_checkpoint(client, settings, weights, checkpoint_meta(settings))
    # when a predictor starts, then its first look at latest ends in one refusal with the
    # error as reason, not in a reloader retrying the same load over and over
    with Predictor(client, settings, name="engine-1") as predictor:
        assert predictor.reloader.synced.is_set()
        assert predictor.reloader.rejected == {bad}
        with pytest.raises(NoModelYet):
            predictor.predict(FEATURES)
    (reason,) = rejections(client, settings)
    assert reason.startswith(f"v{bad}: RuntimeError('factory bug")


def unreachable_clients() -> Iterator[redis.Redis]:
    """A port nothing listens on, and a server that accepts and then never answers."""
    no_retry = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 0.2}
    with socket.create_server(("127.0.0.1", 0)) as closed:
        closed_port = closed.getsockname()[1]
    yield redis.Redis(port=closed_port, **no_retry)
    with socket.create_server(("127.0.0.1", 0)) as stalled:
        yield redis.Redis(port=stalled.getsockname()[1], **no_retry)


def test_after_a_rollback_the_predictor_answers_with_that_version_again(client, settings):
    # given a predictor on version 2
    publish(client, settings, seed=1)
    publish(client, settings, seed=2)
    with Predictor(client, settings, name="engine-1") as predictor:
        assert predictor.version == 2
        # when an operator rolls back to version 1, then it answers with version 1
        CheckpointRegistry(client, settings.keys).rollback(1)
        wait_until(lambda: predictor.version == 1, 30, "the rollback")
        assert predictor.predict(FEATURES).model_version == 1


def test_a_rollback_read_in_the_same_batch_as_a_publish_is_followed(client, settings):
    # given a predictor on version 2
    publish(client, settings, seed=1)
    publish(client, settings, seed=2)
    with Predictor(client, settings, name="engine-1") as predictor:
        assert predictor.version == 2
        # when version 3 is published and latest rolled back to 1 in one transaction, so that
        # the reloader reads both announcements at once
        keys, weights = settings.keys, weights_bytes(state_of(seeded_model(settings, 3)))
        pipe = client.pipeline(transaction=True)
        pipe.hset(
            keys.checkpoint(3),
            mapping={
                "weights": weights,
                "sha256": sha256_hex(weights),
                "meta": orjson.dumps(checkpoint_meta(settings)),
            },
        )
        pipe.xadd(keys.checkpoints, {"kind": "published", "version": 3})
        pipe.set(keys.latest, 1)
        pipe.xadd(keys.checkpoints, {"kind": "rollback", "version": 1})
        pipe.execute()
        # then it goes back to version 1
        wait_until(lambda: predictor.version == 1, 30, "the rollback")
    loaded = [e.details["version"] for e in events_of(client, settings, "checkpoint_loaded")]
    assert loaded == ["2", "1"]


def test_a_rollback_missed_while_disconnected_is_followed_on_reconnect(client, settings, redis_url):
    # given a predictor on version 2, on a connection of its own
    publish(client, settings, seed=1)
    publish(client, settings, seed=2)
    engine = redis.Redis.from_url(redis_url)
    with Predictor(engine, settings, name="engine-1") as predictor:
        assert predictor.version == 2
        # when latest goes back to 1 unannounced (as if the announcement was missed) and
        # its connections are killed
        client.set(settings.keys.latest, 1)
        assert client.client_kill_filter(_type="normal", skipme=True) >= 1
        # then on reconnecting it follows latest back to version 1
        wait_until(lambda: predictor.version == 1, 30, "the missed rollback")
    engine.close()


def test_a_lost_or_stalled_connection_during_a_load_is_not_a_refusal(client, settings):
    # given a published checkpoint, and a reloader whose Redis is gone or stalled
    version = publish(client, settings, seed=1)
    for unreachable in unreachable_clients():
        reloader = Reloader(unreachable, settings, "w1")
        # when it loads, then the connection error reaches the reconnect loop and the
        # version is not marked as refused: it loads once Redis answers again
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            reloader.load(version)
        assert reloader.rejected == set()
        reloader.client = reloader.registry.client = client
        assert reloader.load(version).version == version
    assert rejections(client, settings) == []


def test_the_reloader_thread_outlives_read_timeouts_and_catches_up(client, settings, redis_url):
    # given a predictor whose socket timeout is shorter than its blocking reads, so that
    # every XREAD BLOCK ends in a TimeoutError
    publish(client, settings, seed=1)
    impatient = redis.Redis.from_url(redis_url, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
    settings = settings.with_overrides(block_ms=2000)
    with Predictor(impatient, settings) as predictor:
        assert predictor.version == 1
        # when a new version is published, then the thread, still alive, loads it on one
        # of its reconnects
        version = publish(client, settings, seed=2)
        wait_until(lambda: predictor.version == version, 30, f"version {version}")
        assert predictor.reloader._thread.is_alive()
    impatient.close()


def test_a_client_that_decodes_replies_is_refused_before_it_mangles_a_checkpoint(
    client, settings, redis_url
):
    # given version 1, and an engine's client made with decode_responses=True
    publish(client, settings, seed=1)
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    # when a Predictor is built on it
    with pytest.raises(TypeError, match="decode_responses=False"):
        Predictor(decoding, settings, name="engine-1").start()
    # then it says why at once, and nothing was announced to the operators
    assert events_of(client, settings, "checkpoint_rejected") == []
    decoding.close()


def publish_archived(registry: CheckpointRegistry, settings: Settings, seed: int) -> int:
    """Publish a seeded model through a registry that archives to models/; its version."""
    weights = weights_bytes(state_of(seeded_model(settings, seed)))
    return registry.publish(
        weights, sha256_hex(weights), checkpoint_meta(settings), registry.latest_version()
    )


def test_a_pinned_predictor_answers_with_its_version_while_latest_moves_on(client, settings):
    # given two versions, a predictor pinned to the first and one that follows latest
    first = publish(client, settings, seed=1)
    publish(client, settings, seed=2)
    with (
        Predictor(client, settings, name="pinned", version=first) as pinned,
        Predictor(client, settings, name="following") as following,
    ):
        # when latest moves on to a third version
        third = publish(client, settings, seed=3)
        wait_until(lambda: following.version == third, 30, "the follower on the third version")
        # then the pinned one still answers with the first version's forward pass
        signal = pinned.predict(FEATURES)
        assert (signal.model_version, pinned.version) == (first, first)
        expected = local_probabilities(stored_model(client, settings, first), FEATURES)
        got = [signal.probabilities[a] for a in ("BUY", "SELL", "HOLD")]
        assert got == pytest.approx(expected, abs=1e-6)
        assert following.predict(FEATURES).model_version == third
    # and pinning announces nothing: only the follower's hot reloads are events
    loaded = events_of(client, settings, "checkpoint_loaded")
    assert {e.details["worker"] for e in loaded} == {"following"}


def test_a_version_redis_no_longer_keeps_is_pinned_from_the_archive_and_verified(client, settings):
    # given three archived versions of which Redis keeps only the newest
    registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir), keep=1)
    first, _, third = (publish_archived(registry, settings, seed) for seed in (1, 2, 3))
    assert registry.fetch(first) is None
    # when the first is pinned, then it is read from models/ and answers as itself
    with Predictor(client, settings, version=first) as pinned:
        assert pinned.predict(FEATURES).model_version == first
    # when its archived weights are damaged, then pinning it is refused with the reason
    weights = settings.data_dir / "models" / f"v{first}.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        Predictor(client, settings, version=first).start()
    # and a version that never existed says where it was looked for
    with pytest.raises(CheckpointError, match="not in Redis or the archive"):
        Predictor(client, settings, version=third + 1).start()
    with pytest.raises(NoModelYet, match="call start"):
        Predictor(client, settings, version=third).predict(FEATURES)
