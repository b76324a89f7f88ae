"""The worker loop: the one place that owns the stop flag, burst mode, the health key, the
(re)connect step, a periodic chore, and capped exponential backoff with jitter while Redis is
away. Every worker (detector, trainer, inference) and the reloader thread run their own step
in it, so each of them holds only what it does with one pass."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import redis

from negcase.store.connection import backoff_s
from negcase.store.health import HealthKey

# Lost, refused or stalled connections: Redis is away, not our input's fault. A socket
# timeout is Redis being away too (redis.TimeoutError is no ConnectionError).
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError)
# In burst mode reads do not block: how long to wait for other workers' pending work.
BURST_POLL_S = 0.05

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    """What the loop needs of a stop signal (StopFlag, or a threading.Event)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def _nothing() -> None:
    return None


class WorkerLoop:
    """Runs one step after another until `stop` is set; in burst mode, until a pass finds no
    work and `drained()` says none is left anywhere.

    Before each pass it refreshes the health key (rate-limited by HealthKey); before the
    first pass and after every reconnect it runs `on_connect` (create a group, resume pending
    entries) and then `chore`, which also runs every `chore_every_s` (claim what dead
    workers left). A pass that finds no work is followed by a pause of `idle_s`. When Redis
    is away it runs `on_lost`, waits backoff_s(failures) and tries again; with
    `survive_errors`, any other exception is waited out the same way (a thread that must not
    die of a surprise). On the way out it clears the health key.
    """

    def __init__(
        self,
        name: str,
        stop: Stoppable,
        *,
        burst: bool = False,
        idle_s: float = 0.0,
        health: HealthKey | None = None,
        health_info: Callable[[], dict[str, object]] = dict,
        on_connect: Callable[[], None] = _nothing,
        chore: Callable[[], None] = _nothing,
        chore_every_s: float = math.inf,
        on_lost: Callable[[], None] = _nothing,
        drained: Callable[[], bool] = lambda: True,
        survive_errors: bool = False,
    ) -> None:
        self.name = name
        self.stop = stop
        self.burst = burst
        self.idle_s = idle_s
        self.health = health
        self.health_info = health_info
        self.on_connect = on_connect
        self.chore = chore
        self.chore_every_s = chore_every_s
        self.on_lost = on_lost
        self.drained = drained
        self.survive_errors = survive_errors

    def refresh_health(self) -> None:
        """Refresh the health key if one is due (rate-limited; safe from any thread)."""
        if self.health is not None:
            self.health.refresh(**self.health_info())

    def run(self, step: Callable[[], bool]) -> None:
        """Call `step` (which returns whether it found work) until told to stop."""
        failures = 0
        connected = False
        chore_due_s = 0.0
        while not self.stop.is_set():
            try:
                self.refresh_health()
                if not connected:
                    self.on_connect()
                    connected, chore_due_s = True, 0.0
                if time.monotonic() >= chore_due_s:
                    self.chore()
                    chore_due_s = time.monotonic() + self.chore_every_s
                if not step():
                    if self.burst and self.drained():
                        break
                    self.stop.wait(self.idle_s)
                if failures:
                    log.info("%s: Redis reachable again after %d failed attempts", self.name,
                             failures)  # fmt: skip
                failures = 0
            except REDIS_AWAY as error:
                self.on_lost()
                self._pause(failures, f"Redis unreachable ({error})")
                failures, connected = failures + 1, False
            except Exception as error:
                if not self.survive_errors:
                    raise
                self._pause(failures, f"unexpected {error!r}")
                failures, connected = failures + 1, False
        if self.health is not None:
            with contextlib.suppress(redis.RedisError):
                self.health.clear()

    def _pause(self, failures: int, why: str) -> None:
        delay = backoff_s(failures)
        log.warning("%s: %s; retry in %.2fs", self.name, why, delay)
        self.stop.wait(delay)
