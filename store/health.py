"""Worker health keys: each worker refreshes `<ns>:health:<kind>:<host>:<pid>` with a TTL, so
a key that exists means a worker that beat recently."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import orjson
import redis

from store.keys import Keys


def worker_id(kind: str) -> str:
    """`<kind>:<host>:<pid>`: unique among live workers, and findable by kind and host."""
    return f"{kind}:{socket.gethostname()}:{os.getpid()}"


class HealthKey:
    """One worker's health key, refreshed at most once per `every_s`."""

    def __init__(self, client: redis.Redis, keys: Keys, kind: str, ttl_s: int) -> None:
        self.client = client
        self.kind = kind
        self.key = keys.health(worker_id(kind))
        self.ttl_s = ttl_s
        self.every_s = max(1.0, ttl_s / 3)
        self._last_s = 0.0

    def refresh(self, **info: Any) -> None:
        """Write the health record (kind, host, pid, time, and `info`) if one is due."""
        now = time.monotonic()
        if now - self._last_s < self.every_s:
            return
        self._last_s = now
        record = {
            "kind": self.kind,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at_ms": int(time.time() * 1000),
            **info,
        }
        self.client.set(self.key, orjson.dumps(record), ex=self.ttl_s)

    def clear(self) -> None:
        """Remove the key on a clean stop, so the worker does not look alive after it."""
        self.client.delete(self.key)


def live_workers(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every worker whose health key has not expired, sorted by kind and host."""
    names = list(client.scan_iter(match=f"{keys.health_prefix}*", count=500))
    if not names:
        return []
    records = [orjson.loads(raw) for raw in client.mget(names) if raw is not None]
    return sorted(records, key=lambda r: (r.get("kind", ""), r.get("host", ""), r.get("pid", 0)))
