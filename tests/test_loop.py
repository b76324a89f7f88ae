"""The worker loop every worker runs its step in: burst mode, health, reconnect, stop."""

from __future__ import annotations

import socket

import pytest
import redis

from negcase.runtime.loop import WorkerLoop
from negcase.runtime.shutdown import StopFlag
from negcase.store.health import HealthKey, live_workers


def closed_port_client() -> redis.Redis:
    """A client for a port nothing listens on: every command raises ConnectionError."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    return redis.Redis(port=port, socket_timeout=0.2)


def test_burst_mode_works_until_drained_with_a_health_key_while_it_runs(client, settings):
    # given three passes of work, and a health key
    health = HealthKey(client, settings.keys, "tester", settings.health_ttl_s)
    work = [3, 2, 1]
    seen_alive: list[bool] = []

    def step() -> bool:
        seen_alive.append(bool(live_workers(client, settings.keys)))
        return bool(work) and bool(work.pop())

    # when the loop runs in burst mode
    connects: list[int] = []
    WorkerLoop(
        "tester",
        StopFlag(),
        burst=True,
        health=health,
        on_connect=lambda: connects.append(1),
    ).run(step)
    # then it stopped once a pass found nothing, connected once, looked alive while it ran,
    # and cleared its health key on the way out
    assert work == [] and connects == [1]
    assert all(seen_alive) and len(seen_alive) == 4
    assert live_workers(client, settings.keys) == []


def test_when_redis_goes_away_the_loop_backs_off_and_connects_again(client):
    # given a step whose first pass meets a Redis that is gone
    unreachable = closed_port_client()
    events: list[str] = []
    passes = iter([unreachable.ping, lambda: False])

    def step() -> bool:
        next(passes)()
        events.append("pass")
        return False

    # when the loop runs in burst mode
    WorkerLoop(
        "tester",
        StopFlag(),
        burst=True,
        on_connect=lambda: events.append("connect"),
        chore=lambda: events.append("chore"),
        on_lost=lambda: events.append("lost"),
    ).run(step)
    # then the lost connection was noted, and setup and chore ran again before the next pass
    assert events == ["connect", "chore", "lost", "connect", "chore", "pass"]


def test_only_a_loop_told_to_survive_errors_outlives_a_bug_in_its_step():
    # given a step that fails once with an error that is not Redis's
    def failing_steps():
        yield ValueError("a bug")
        while True:
            yield None

    for survive in (False, True):
        outcomes = failing_steps()

        def step(outcomes=outcomes) -> bool:
            error = next(outcomes)
            if error is not None:
                raise error
            return False

        loop = WorkerLoop("tester", StopFlag(), burst=True, survive_errors=survive)
        # when it runs, then the error ends it, unless it survives errors: then it retries
        if survive:
            loop.run(step)
        else:
            with pytest.raises(ValueError, match="a bug"):
                loop.run(step)


def test_a_stop_ends_the_loop_after_the_pass_in_hand():
    # given a loop outside burst mode whose step asks it to stop
    stop = StopFlag()
    passes: list[int] = []

    def step() -> bool:
        passes.append(1)
        stop.set()
        return True

    # when it runs, then it ends after that pass
    WorkerLoop("tester", stop).run(step)
    assert passes == [1]
