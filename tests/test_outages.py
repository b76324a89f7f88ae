"""Outages a fault-injection run makes: a killed holder of the publish lock, a trainer
waiting on that lock while leases expire, Redis restarting under a session, and a publish
whose reply is lost. Each ends with the system's state settled, by the workers themselves."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from negcase.runtime.settings import Settings
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import connect
from negcase.store.local_redis import LocalRedis, free_port
from negcase.store.queue import CaseQueue
from tests.conftest import ROOT, wait_until, worker_env
from tests.test_checkpoints import publish_new
from tests.training_cases import add_cases, make_case

# How long the publish lock may outlive its holder: "a few seconds".
FEW_SECONDS_MS = 5000
HOLDER = """
import time
from negcase.runtime.settings import Settings
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import connect

settings = Settings.from_env()
with CheckpointRegistry(connect(settings.redis_url), settings.keys).publish_lock():
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_publish_lock_outlives_a_killed_holder_by_seconds_only(client, settings) -> None:
    # given a process holding the publish lock
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], cwd=ROOT, env=worker_env(settings),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        lock = settings.keys.publish_lock
        # then its TTL is a few seconds, and the holder renews it while it lives
        ttls_ms = [client.pttl(lock)]
        assert 0 < ttls_ms[0] <= FEW_SECONDS_MS

        def renewed() -> bool:
            ttls_ms.append(client.pttl(lock))
            return ttls_ms[-1] > min(ttls_ms) + 200  # it went up again: renewed

        wait_until(renewed, 30, "the holder to renew it")
        # when the holder is killed, the lock goes within that TTL
        holder.kill()
        holder.wait()
        assert client.pttl(lock) <= FEW_SECONDS_MS
        wait_until(lambda: not client.exists(lock), 30, "the lock to expire")
    finally:
        holder.kill()
        holder.wait()


def test_a_trainer_waiting_for_the_publish_lock_still_reaps_expired_leases(
    client, settings, spawn
) -> None:
    keys = settings.keys
    # given a case a dead trainer leased for a few seconds
    add_cases(client, settings, [make_case(1, [0.1] * 8, priority=1, epochs=10)])
    [stuck] = CaseQueue(client, keys, lease_s=6.0).claim("dead-trainer")
    # and a live holder of the publish lock that keeps it (renewing) for the whole story
    registry = CheckpointRegistry(client, keys)
    release, held = threading.Event(), threading.Event()

    def hold() -> None:
        with registry.publish_lock():
            held.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        token = client.get(keys.publish_lock)
        # when a trainer trains another case and waits for the lock to publish it
        add_cases(client, settings, [make_case(2, [0.2] * 8, priority=5, epochs=10)])
        spawn(
            "train",
            "--consumer",
            "waiter",
            env=worker_env(settings, NEGCASE_LEASE_S="2", NEGCASE_MIN_OUTCOMES="0"),
        )
        # then the dead trainer's lease is reaped while the lock is still held
        wait_until(lambda: client.zscore(keys.leased, stuck.case_id) is None, 60, "the reap")
        assert client.get(keys.publish_lock) == token, "reaped only once the lock changed hands"
        assert client.zscore(keys.queue, stuck.case_id) is not None
    finally:
        release.set()
        holder.join()


def test_a_session_redis_cuts_off_is_closed_once_redis_is_back(tmp_path: Path, spawn) -> None:
    # given a trainer in a session, on a Redis of its own that will restart (AOF on)
    server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    try:
        settings = Settings(redis_url=server.url, data_dir=tmp_path / "negative")
        client = connect(server.url)
        add_cases(client, settings, [make_case(1, [0.3] * 8, epochs=4000)])
        env = worker_env(
            settings,
            NEGCASE_LEASE_S="30",
            NEGCASE_EARLY_STOP_PATIENCE="0",
            NEGCASE_MIN_OUTCOMES="0",
        )
        trainer = spawn("train", "--consumer", "cut", env=env)
        wait_until(lambda: client.zcard(settings.keys.sessions), 60, "the session to start")
        [session_id] = [s.decode() for s in client.zrange(settings.keys.sessions, 0, -1)]
        # when Redis goes away until the trainer has met the outage, then comes back
        server.stop()
        _wait_for_line(trainer, "retry in")
        server = LocalRedis(tmp_path / "redis", port=server.port).start()
        client = connect(server.url)
        # then the trainer closes the session it was cut off in: once, saying why
        wait_until(lambda: _closed(client, settings), 60, "the session to be closed")
        [(closed_id, outcome)] = _closed(client, settings)
        assert closed_id == session_id and outcome == "cut_off"
        assert client.zscore(settings.keys.open_sessions, session_id) is None
    finally:
        server.stop()


def _closed(client: redis.Redis, settings: Settings) -> list[tuple[str, str]]:
    return [
        (fields[b"session_id"].decode(), fields[b"outcome"].decode())
        for _, fields in client.xrange(settings.keys.events)
        if fields[b"type"] == b"training_completed"
    ]


def _wait_for_line(process: subprocess.Popen[str], text: str) -> None:
    """Read the process's stderr until a line holds `text` (it backs off after an error)."""
    found = threading.Event()

    def read() -> None:
        for line in process.stderr:
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(60), f"no line with {text!r} from the process"


class ReplyDropper:
    """A TCP proxy in front of Redis that, once armed, forwards the next EVALSHA but drops
    its reply and closes the connection: a network cut just after the request got through."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.armed = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.redis_port))
                cut = threading.Event()
                threading.Thread(target=self._requests, args=(near, far, cut), daemon=True).start()
                threading.Thread(target=self._replies, args=(far, near, cut), daemon=True).start()

    def _requests(self, near: socket.socket, far: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := near.recv(65536):
                if self.armed and b"EVALSHA" in data:
                    self.armed = False
                    cut.set()
                far.sendall(data)

    def _replies(self, far: socket.socket, near: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := far.recv(65536):
                if cut.is_set():  # the reply is lost, and the connection with it
                    near.shutdown(socket.SHUT_RDWR)
                    far.shutdown(socket.SHUT_RDWR)
                    return
                near.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_a_publish_whose_reply_was_lost_is_named_published_once_redis_answers(
    client, settings, redis_server
) -> None:
    # given a registry that reaches Redis through a link that will lose one reply
    proxy = ReplyDropper(redis_server.port)
    try:
        registry = CheckpointRegistry(connect(proxy.url), settings.keys, Archive(settings.data_dir))
        assert publish_new(registry, None) == 1
        # when the reply to v2's publish is lost (the script itself ran)
        proxy.armed = True
        with pytest.raises(redis.ConnectionError):
            publish_new(registry, 1)
        models = settings.data_dir / "models"
        assert client.get(settings.keys.latest) == b"2"
        assert (models / ".v2.json.unpublished").exists() and not (models / "v2.json").exists()
        # then once Redis answers again, the registry names v2 published
        registry.settle_pending()
        assert (models / "v2.json").exists() and not (models / ".v2.json.unpublished").exists()
        assert [info.version for info in registry.list()] == [1, 2]
    finally:
        proxy.close()
