"""Connecting to Redis, naming a URL safely in messages, and the backoff used to reconnect."""

from __future__ import annotations

import random
from urllib.parse import urlsplit

import redis

SOCKET_TIMEOUT_S = 30.0


def connect(url: str) -> redis.Redis:
    """A client for redis://, rediss:// or unix:// URLs (ACL user and password in the URL).

    Replies stay bytes: workers decode each value once, where they know its type.
    """
    options: dict[str, object] = {}
    if urlsplit(url).scheme != "unix":
        # TCP only: redis-py's unix socket connection takes no keepalive option.
        options["socket_keepalive"] = True
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        # A dead connection (a primary that vanished without a reset) fails within this,
        # instead of after TCP keepalive's hours; blocking reads stay well below it.
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        retry_on_timeout=False,
        **options,
    )


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, location = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user + ':' if user else ''}***@{location}"


def require_bytes_replies(client: redis.Redis, who: str) -> None:
    """TypeError unless `client` returns bytes: checkpoints are binary safetensors blobs, and
    a client built with decode_responses=True would mangle them before anyone could check."""
    pool = getattr(client, "connection_pool", None)
    if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
        raise TypeError(
            f"{who} needs a Redis client that returns bytes: build it with "
            "decode_responses=False (the default), or use negcase.store.connection.connect(url)"
        )


def backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 5.0, jitter: float = 0.5) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0-based): capped exponential,
    with up to `jitter` of it randomized so that many workers do not reconnect in step."""
    delay = min(cap_s, base_s * (2**attempt))
    return delay * (1 - jitter * random.random())
