"""Worker health keys: each worker refreshes `<ns>:health:<kind>:<host>:<pid>` with a TTL, so
a key that exists means a worker that beat recently; `<ns>:workers` indexes them by expiry."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import orjson
import redis

from negcase.store.keys import Keys
from negcase.store.streams import default_consumer_name


def worker_id(kind: str) -> str:
    """`<kind>:<host>:<pid>`: unique among live workers, and findable by kind and host."""
    return f"{kind}:{default_consumer_name()}"


class HealthKey:
    """One worker's health key, refreshed at most once per `every_s`."""

    def __init__(self, client: redis.Redis, keys: Keys, kind: str, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.kind = kind
        self.worker = worker_id(kind)
        self.key = keys.health(self.worker)
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
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key, orjson.dumps(record), ex=self.ttl_s)
        pipe.zadd(self.keys.workers, {self.worker: record["at_ms"] + self.ttl_s * 1000})
        pipe.execute()

    def clear(self) -> None:
        """Remove the key on a clean stop, so the worker does not look alive after it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.key)
        pipe.zrem(self.keys.workers, self.worker)
        pipe.execute()


def live_workers(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every worker whose health key has not expired, sorted by kind and host: two round
    trips, however many keys the namespace holds (no SCAN)."""
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.workers, "-inf", now_ms)
    pipe.zrange(keys.workers, 0, -1)
    _, names = pipe.execute()
    if not names:
        return []
    raw_records = client.mget([keys.health(name.decode()) for name in names])
    records = [orjson.loads(raw) for raw in raw_records if raw is not None]
    return sorted(records, key=lambda r: (r.get("kind", ""), r.get("host", ""), r.get("pid", 0)))
