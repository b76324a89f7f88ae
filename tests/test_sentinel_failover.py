"""A Sentinel failover under load, with real servers and real workers: a primary, a replica and
three sentinels; trades flowing, a trainer training, an inference worker answering; the
primary is SIGKILLed; everything carries on against the promoted replica."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import redis

from negcase.client.signal_client import SignalClient, SignalTimeout
from negcase.client.trades import encode_trade
from negcase.runtime.settings import Settings
from negcase.schemas.case import case_id_for
from negcase.schemas.event import Event
from negcase.schemas.signal import SignalRequestError
from negcase.store.connection import connect
from negcase.store.keys import DETECTOR_GROUP
from negcase.store.queue import queue_counts
from tests.conftest import wait_until, worker_env
from tests.topologies import SentinelDeployment

pytestmark = pytest.mark.slow

FEATURES = [0.3, -0.2, 0.1, 0.4, -0.5, 0.6, 0.0, 0.2]
# Replica acks on: a detector batch and a publish return once the replica has them.
DURABLE = {"NEGCASE_MIN_REPLICA_ACKS": "1", "NEGCASE_REPLICA_ACK_TIMEOUT_MS": "1000"}
FAST_TRAINING = {
    "NEGCASE_EPOCH_MULTIPLIER": "0.05",
    # No validation window and no minimum of outcomes: every session publishes, at once.
    "NEGCASE_HELDOUT_SHARE": "0",
    "NEGCASE_MIN_OUTCOMES": "0",
    "NEGCASE_LEASE_S": "5",
}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    """Primary, replica, three sentinels: a primary is down after 0.5 s without an answer."""
    started = SentinelDeployment(tmp_path / "redis", down_after_ms=500).start()
    yield started
    started.stop()


@pytest.fixture
def client(deployment: SentinelDeployment) -> Iterator[redis.Redis]:
    """A client that follows the primary the sentinels name."""
    c = connect(deployment.url)
    yield c
    c.close()


@pytest.fixture
def settings(client, deployment: SentinelDeployment, tmp_path: Path) -> Settings:
    """The deployment's sentinel URL and a fresh archive; a published version serves at once
    (no canary), as in every test but the canary's."""
    return Settings(redis_url=deployment.url, data_dir=tmp_path / "negative", canary_share=0.0)


@dataclass
class Producer:
    """A trading engine: XADDs losing trades, each followed by its own WAIT for one replica
    (README, "Durability across a failover"). `acknowledged` holds the trades a replica
    confirmed; `added` those XADD alone confirmed (what an engine without WAIT believes)."""

    url: str
    settings: Settings
    added: set[str] = field(default_factory=set)
    acknowledged: set[str] = field(default_factory=set)
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = connect(self.url)  # one thread, one connection: WAIT counts its XADD
        n = 0
        while not self.stop.is_set():
            n += 1
            trade_id = f"f-{n}"
            trade = {
                **{"trade_id": trade_id, "symbol": "ETH/USDT", "side": "BUY"},
                **{"entry_price": 3000, "exit_price": 3000 - n % 90 - 1, "features": FEATURES},
            }
            try:
                client.xadd(self.settings.keys.trades, encode_trade(trade, "flat"))
                self.added.add(trade_id)
                if client.wait(1, 1000) >= 1:
                    self.acknowledged.add(trade_id)
            except redis.RedisError:
                self.failed += 1
            self.stop.wait(0.02)


@dataclass
class Requester:
    """An engine asking for signals: when each request was sent, and how it ended."""

    settings: Settings
    outcomes: list[tuple[float, float, int | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        signals = SignalClient.from_settings(self.settings)
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                version: int | None = signals.request(FEATURES, timeout_s=0.5).model_version
            except (SignalTimeout, SignalRequestError, redis.RedisError):
                version = None
            self.outcomes.append((sent, time.monotonic(), version))
            self.stop.wait(0.05)

    def answered_after(self, moment: float, version: int = 1) -> list[tuple[float, float, int]]:
        """Requests sent after `moment` answered by `version` or a later one, oldest first."""
        return [o for o in self.outcomes if o[0] > moment and (o[2] or 0) >= version]

    def failed_between(self, start: float, end: float) -> int:
        """Requests that ended without a signal after `start`, sent before `end`."""
        return sum(1 for o in self.outcomes if o[1] > start and o[0] < end and o[2] is None)


def background(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def case_added_counts(client: redis.Redis, settings: Settings) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, fields in client.xrange(settings.keys.events):
        event = Event.from_fields(fields)
        if event.type == "case_added":
            case_id = str(event.details["case_id"])
            counts[case_id] = counts.get(case_id, 0) + 1
    return counts


def case_ids(client: redis.Redis, settings: Settings) -> set[str]:
    return {member.decode() for member in client.smembers(settings.keys.cases)}


def published_versions(client: redis.Redis, settings: Settings) -> list[tuple[int, str]]:
    return [
        (int(fields[b"version"]), fields[b"sha256"].decode())
        for _, fields in client.xrange(settings.keys.checkpoints)
        if fields[b"kind"] == b"published"
    ]


def pending(client: redis.Redis, settings: Settings) -> int:
    return client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"]


def latest(client: redis.Redis, settings: Settings) -> int:
    raw = client.get(settings.keys.latest)
    return 0 if raw is None else int(raw)


def test_a_sigkilled_primary_fails_over_and_nothing_acknowledged_is_lost(
    deployment: SentinelDeployment, client, settings: Settings, spawn
) -> None:
    # given a detector, a trainer and an inference worker, all with replica acks on,
    # trades flowing with a WAIT each, and an engine asking for signals
    env = worker_env(settings, **DURABLE, **FAST_TRAINING)
    spawn("detect", "--consumer", "d1", "--block-ms", "200", "--claim-idle-ms", "2000", env=env)
    trainer = spawn("train", "--consumer", "t1", env=env)
    spawn("serve", "--consumer", "w1", "--block-ms", "200", env=env)
    producer, requester = Producer(deployment.url, settings), Requester(settings)
    threads = [background(producer.run), background(requester.run)]
    wait_until(lambda: latest(client, settings) >= 2, 90, "two published checkpoints")
    wait_until(lambda: requester.answered_after(0, version=2), 60, "replies from v2 or later")

    # when the primary is killed without warning
    before = latest(client, settings)
    killed_at = time.monotonic()
    old_port = deployment.kill_primary()
    wait_until(lambda: old_port not in deployment.named_primaries(), 30, "the promotion")
    promoted_s = time.monotonic() - killed_at
    # and is restarted as a replica of the new primary
    deployment.restart(old_port)

    # then signal requests resume, trades keep becoming cases, and the trainer publishes
    wait_until(lambda: requester.answered_after(killed_at), 60, "a reply after the failover")
    resumed = requester.answered_after(killed_at)[0]
    cases_then = client.scard(settings.keys.cases)
    wait_until(lambda: client.scard(settings.keys.cases) > cases_then + 20, 60, "new cases")
    wait_until(lambda: latest(client, settings) >= before + 2, 90, "publishes after failover")
    producer.stop.set()
    requester.stop.set()
    for thread in threads:
        thread.join(10)
    trainer.send_signal(signal.SIGTERM)
    trainer.wait(60)

    # then every acknowledged trade is a case, exactly once (stored, announced, archived)
    wanted = {case_id_for(trade_id) for trade_id in producer.acknowledged}
    wait_until(lambda: wanted <= case_ids(client, settings), 60, "acknowledged trades' cases")
    announced = case_added_counts(client, settings)
    assert {case_id: announced.get(case_id, 0) for case_id in wanted} == dict.fromkeys(wanted, 1)
    archived = {path.stem for path in (settings.data_dir / "cases").glob("*.msgpack")}
    assert wanted <= archived
    wait_until(lambda: pending(client, settings) == 0, 30, "every trade acknowledged")
    counts = queue_counts(client, settings.keys)
    assert counts["queued"] + counts["leased"] + counts["done"] + counts["dead"] == counts["total"]

    # and no checkpoint version was lost or handed out twice: versions only increase, and
    # each one the archive holds as published (its publish was confirmed) is in Redis with
    # the same content
    versions = published_versions(client, settings)
    numbers = [version for version, _ in versions]
    assert numbers == sorted(set(numbers))
    confirmed = {
        int(path.stem[1:]): orjson.loads(path.read_bytes())["sha256"]
        for path in (settings.data_dir / "models").glob("v*.json")
    }
    assert confirmed and set(confirmed.items()) <= set(versions)
    assert latest(client, settings) == numbers[-1]

    # and the inference worker serves the latest version
    final = latest(client, settings)
    probe = SignalClient.from_settings(settings)
    wait_until(lambda: _served(probe) == final, 60, f"replies from v{final}")

    # figures for the README (pytest -s shows them)
    only_added = producer.added - producer.acknowledged
    lost_unacknowledged = {case_id_for(t) for t in only_added} - case_ids(client, settings)
    failed_requests = requester.failed_between(killed_at, resumed[0])
    print(
        f"\nfailover: promoted after {promoted_s:.2f}s; signals resumed "
        f"{resumed[1] - killed_at:.2f}s after the kill, {failed_requests} requests failed; "
        f"{len(producer.acknowledged)} trades acknowledged by a replica, 0 lost; "
        f"{len(only_added)} confirmed by XADD only, "
        f"{len(lost_unacknowledged)} of them lost; {producer.failed} XADDs failed; "
        f"checkpoints v{numbers[0]}-v{numbers[-1]}, {len(confirmed)} confirmed"
    )


def _served(signals: SignalClient) -> int | None:
    try:
        return signals.request(FEATURES, timeout_s=1.0).model_version
    except (SignalTimeout, SignalRequestError):
        return None


def test_a_client_never_follows_the_old_primarys_address_back(deployment, client) -> None:
    # given a connection of the client's pool, connected to the primary
    connection = client.connection_pool.get_connection()
    # when the primary is killed, the sentinels promote the replica, and the old primary
    # comes back on its port as it was: a primary with old data, for a few seconds
    old_port = deployment.kill_primary()
    wait_until(lambda: old_port not in deployment.named_primaries(), 30, "the promotion")
    deployment.restart(old_port, as_replica=False)
    # then a command on that connection (the path a command retried after losing its
    # connection takes in redis-py) reconnects to the promoted replica, not the old address
    connection.disconnect()
    connection.send_command("SET", "k", "after")
    assert connection.read_response() == b"OK"
    assert connection.port == deployment.primary_port() != old_port
    client.connection_pool.release(connection)
    assert connect(f"redis://127.0.0.1:{old_port}/0").get("k") is None
