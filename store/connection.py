"""Connecting to Redis, and the backoff used to reconnect."""

from __future__ import annotations

import random

import redis

SOCKET_TIMEOUT_S = 30.0


def connect(url: str) -> redis.Redis:
    """A client for redis://, rediss:// or unix:// URLs (ACL user and password in the URL).

    Replies stay bytes: workers decode each value once, where they know its type.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_keepalive=True,
        # A dead connection (a primary that vanished without a reset) fails within this,
        # instead of after TCP keepalive's hours; blocking reads stay well below it.
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 5.0, jitter: float = 0.5) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0-based): capped exponential,
    with up to `jitter` of it randomized so that many workers do not reconnect in step."""
    delay = min(cap_s, base_s * (2**attempt))
    return delay * (1 - jitter * random.random())
