"""NEGCASE_MIN_REPLICA_ACKS: a detector batch and a checkpoint publish WAIT for replicas on the
connection that wrote them, with a real primary and replica."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import safetensors.numpy

from negcase.client.trades import encode_trade
from negcase.processes.detector import LossDetector
from negcase.runtime.settings import Settings
from negcase.schemas.case import case_id_for
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import connect
from negcase.store.local_redis import LocalRedis
from negcase.store.replication import ReplicaAcksMissing
from tests.conftest import run_burst
from tests.test_detector import losing
from tests.topologies import wait_for


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRedis, LocalRedis]]:
    """A primary and one replica of it."""
    base = tmp_path_factory.mktemp("replicated")
    primary = LocalRedis(base / "primary").start()
    follow = ["--replicaof", "127.0.0.1", str(primary.port)]
    replica = LocalRedis(base / "replica", extra_args=follow).start()
    wait_for(
        lambda: connect(replica.url).info("replication")["master_link_status"] == "up",
        "the replica to sync",
    )
    yield primary, replica
    replica.stop()
    primary.stop()


def test_with_a_replica_a_batch_returns_once_the_replica_has_it(replicated, tmp_path) -> None:
    # given a primary whose replica is slow to apply what it receives (asleep for 0.3 s)
    primary, replica = replicated
    client, lagging = connect(primary.url), connect(replica.url)
    client.flushall()
    settings = Settings(
        redis_url=primary.url, data_dir=tmp_path, min_replica_acks=1, replica_ack_timeout_ms=10_000
    )
    client.xadd(settings.keys.trades, encode_trade(losing("t1"), "flat"))
    sleeper = threading.Thread(target=lagging.execute_command, args=("DEBUG", "SLEEP", "0.3"))
    sleeper.start()
    time.sleep(0.05)  # let the replica fall asleep first (if it has not, the test is weaker)
    # when a detector with one required replica ack stores the batch
    detector = LossDetector(client, settings, "d1", None)
    run_burst(detector)
    # then the replica acknowledged it (the detector counts it as done) and holds the case
    assert detector.totals.cases_added == 1
    sleeper.join()
    assert lagging.sismember(settings.keys.cases, case_id_for("t1"))


def test_without_enough_replicas_the_write_stands_unconfirmed(client, settings: Settings) -> None:
    # given the test Redis, which has no replica, and a setting that asks for one
    wanting = Settings(
        redis_url=settings.redis_url,
        data_dir=settings.data_dir,
        min_replica_acks=1,
        replica_ack_timeout_ms=50,
    )
    client.xadd(wanting.keys.trades, encode_trade(losing("t1"), "flat"))
    # when a detector stores a batch
    detector = LossDetector(client, wanting, "d1", None)
    run_burst(detector)
    # then the batch stands on the primary, but the detector does not count it as done
    assert client.sismember(wanting.keys.cases, case_id_for("t1"))
    assert detector.totals.cases_added == 0
    # and when a trainer publishes, the publish stands but is refused as unconfirmed:
    # the archive does not list it as published
    registry = CheckpointRegistry(
        client, wanting.keys, Archive(wanting.data_dir), acks=wanting.replica_acks
    )
    with pytest.raises(ReplicaAcksMissing, match="only 0 of 1 replicas acknowledged"):
        registry.publish(safetensors.numpy.save({"w": np.zeros(2, np.float32)}), "sha", {}, None)
    assert registry.latest_version() == 1
    assert not (wanting.data_dir / "models" / "v1.json").exists()
