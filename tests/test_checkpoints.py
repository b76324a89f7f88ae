"""The checkpoint registry on a real Redis: compare-and-set publish, announcements, trimming,
the archive, rollback, and fencing by leases."""

from __future__ import annotations

import orjson
import pytest
import redis

from negcase.processes.model import (
    ModelSpec,
    build_model,
    load_verified,
    sha256_hex,
    state_of,
    weights_bytes,
)
from negcase.runtime.settings import Settings
from negcase.store.archive import Archive
from negcase.store.checkpoints import (
    CheckpointMissing,
    CheckpointRegistry,
    PublishConflict,
)
from negcase.store.leases import Lease, LeaseLost
from negcase.store.queue import CaseQueue
from negcase.store.scripts import script

SPEC = ModelSpec(feature_count=8, hidden_sizes=(8,))


def registry_for(client: redis.Redis, settings: Settings, keep: int = 10) -> CheckpointRegistry:
    return CheckpointRegistry(client, settings.keys, Archive(settings.data_dir), keep=keep)


def publish_new(registry: CheckpointRegistry, parent: int | None, **kwargs) -> int:
    weights = weights_bytes(state_of(build_model(SPEC)))
    meta = {"feature_count": 8, "model_spec": SPEC.to_dict(), "case_ids": [], "metrics": {}}
    return registry.publish(weights, sha256_hex(weights), meta, parent, **kwargs)


def announcements(client: redis.Redis, settings: Settings) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(settings.keys.checkpoints)]


def test_first_publish_stores_archives_announces_and_moves_latest(client, settings) -> None:
    registry = registry_for(client, settings)
    version = publish_new(registry, None, trainer="t1")

    assert version == 1 and registry.latest_version() == 1
    stored = registry.fetch(1)
    assert stored is not None and stored.meta["parent_version"] is None
    load_verified(stored, build_model(SPEC), feature_count=8)
    [announcement] = announcements(client, settings)
    assert announcement[b"kind"] == b"published" and announcement[b"version"] == b"1"
    assert announcement[b"sha256"].decode() == stored.sha256
    models = settings.data_dir / "models"
    assert (models / "v1.safetensors").read_bytes() == stored.weights
    assert orjson.loads((models / "v1.json").read_bytes())["sha256"] == stored.sha256


def test_publish_on_a_stale_parent_is_refused_without_trace(client, settings) -> None:
    registry = registry_for(client, settings)
    publish_new(registry, None)
    with pytest.raises(PublishConflict) as conflict:
        publish_new(registry, None)

    assert conflict.value.latest == 1
    assert registry.latest_version() == 1
    assert len(announcements(client, settings)) == 1
    assert sorted(p.name for p in (settings.data_dir / "models").iterdir()) == [
        "v1.json",
        "v1.safetensors",
    ]


def test_versions_increase_and_only_the_last_k_stay_in_redis(client, settings) -> None:
    registry = registry_for(client, settings, keep=3)
    parent = None
    for _ in range(5):
        parent = publish_new(registry, parent)

    infos = registry.list()
    assert [info.version for info in infos] == [1, 2, 3, 4, 5]
    assert [info.in_redis for info in infos] == [False, False, True, True, True]
    assert [info.meta["parent_version"] for info in infos] == [None, 1, 2, 3, 4]
    assert registry.fetch(2) is None and registry.fetch(3) is not None


def test_rollback_points_latest_back_and_restores_a_trimmed_version(client, settings) -> None:
    registry = registry_for(client, settings, keep=2)
    parent = None
    for _ in range(3):
        parent = publish_new(registry, parent)

    assert registry.rollback(1) == 3
    assert registry.latest_version() == 1
    assert registry.fetch_latest() is not None
    last = announcements(client, settings)[-1]
    assert last[b"kind"] == b"rollback" and last[b"previous_version"] == b"3"
    # The next publish builds on the rolled-back version and still gets a new number.
    assert publish_new(registry, 1) == 4


def test_rollback_to_an_unknown_version_fails(client, settings) -> None:
    with pytest.raises(CheckpointMissing):
        registry_for(client, settings).rollback(7)


def test_publish_needs_live_leases_on_the_cases_it_learned(client, settings) -> None:
    registry = registry_for(client, settings)
    queue = CaseQueue(client, settings.keys, lease_s=30)
    client.zadd(settings.keys.queue, {"c1": 100_000})
    [lease] = queue.claim("t1")
    queue.release([lease], "t1")  # the lease is gone: its token no longer counts

    with pytest.raises(LeaseLost):
        publish_new(registry, None, leases=[lease])
    assert registry.latest_version() is None


def archive_files(settings: Settings) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((settings.data_dir / "models").iterdir())}


def test_an_emptied_redis_never_reuses_an_archived_version(client, settings) -> None:
    # given two published versions in the archive
    registry = registry_for(client, settings)
    publish_new(registry, publish_new(registry, None))
    archived = archive_files(settings)
    # when Redis starts empty (a new server; then `retrain-all --from-archive`) and a trainer
    # publishes, through a new registry as a new process would
    client.flushall()
    version = publish_new(registry_for(client, settings), None)

    # then the new version comes after the archived ones, whose files are untouched
    assert version == 3
    after = archive_files(settings)
    assert {name: after[name] for name in archived} == archived
    assert [(info.version, info.in_redis) for info in registry.list()] == [
        (1, False),
        (2, False),
        (3, True),
    ]


def test_a_counter_that_went_backwards_skips_past_the_archive(client, settings) -> None:
    # given a version counter that went backwards below a file already in the archive (a
    # failover lost the INCR; or another lineage wrote this folder)
    models = settings.data_dir / "models"
    registry = registry_for(client, settings)
    (models / "v1.safetensors").write_bytes(b"another lineage's weights")
    client.set(settings.keys.version_counter, 0)

    # when a trainer publishes
    version = publish_new(registry, None)

    # then it gets a number the archive has not seen, and the existing file is untouched
    assert version == 2
    assert archive_files(settings)["v1.safetensors"] == b"another lineage's weights"
    assert registry.latest_version() == 2


def test_files_of_a_publish_that_never_completed_are_not_trusted(client, settings) -> None:
    # given a publish that archived its files but whose script never got through (as when
    # the trainer is killed in between): here Redis refuses it, before writing anything
    registry = registry_for(client, settings)
    client.set(settings.keys.leases, "not a hash")  # WRONGTYPE when the script checks leases
    with pytest.raises(redis.ResponseError):
        publish_new(registry, None, leases=[Lease("nc-1", 1, 0, 100_000.0, 0)])
    client.delete(settings.keys.leases)
    assert "v1.safetensors" in archive_files(settings)  # the weights were written first

    # then neither the listing nor a rollback trusts v1, and the next version is v2
    assert registry.list() == []
    with pytest.raises(CheckpointMissing):
        registry.rollback(1)
    assert publish_new(registry, None) == 2
    assert [info.version for info in registry.list()] == [2]


def test_a_retried_publish_is_done_once_and_the_counter_never_lags(client, settings) -> None:
    # given a publish of v7 whose INCR a failover lost (the counter is still empty)
    keys = settings.keys
    publish = script(client, "publish_checkpoint", "clock", "lease", "store_checkpoint")
    script_keys = [
        *(keys.latest, keys.checkpoint(7), keys.versions, keys.checkpoints, keys.events),
        *(keys.leased, keys.leases, keys.version_counter),
    ]
    args = ["", 7, "", b"weights", "sha-7", b"{}", 100, 100, "t1", 0]
    assert publish(keys=script_keys, args=args) == [b"published", b"7"]
    # when redis-py runs the same script again (its reply was lost with the connection)
    again = publish(keys=script_keys, args=args)
    # then it reports the publish that happened, which was announced once
    assert again == [b"published", b"7"]
    assert [a[b"version"] for a in announcements(client, settings)] == [b"7"]
    # and the next version handed out is past it
    assert client.incr(keys.version_counter) == 8
