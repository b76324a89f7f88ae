"""What every benchmark shares: a Redis to run on, and cleaning up after itself."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import redis

from negcase.runtime.chunks import chunks
from negcase.runtime.settings import Settings
from negcase.store.connection import redacted
from negcase.store.local_redis import LocalRedis, redis_server_binary

FEATURES = [0.1234, -0.5678, 0.9012, -0.3456, 0.7891, -0.2345, 0.6789, -0.0123]


@contextlib.contextmanager
def bench_redis(settings: Settings) -> Iterator[str]:
    """The configured Redis URL, or a local redis-server for the duration of the bench."""
    if settings.redis_url:
        yield settings.redis_url
        return
    folder = Path(tempfile.mkdtemp(prefix="negcase-bench-"))
    try:
        with LocalRedis(folder) as server:
            yield server.url
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def redis_label(client: redis.Redis, settings: Settings) -> str:
    """Which Redis a bench ran on: its version, and the configured URL or the local binary
    (figures from different Redis versions are not comparable)."""
    version = client.info("server")["redis_version"]
    where = redacted(settings.redis_url) if settings.redis_url else redis_server_binary()
    return f"Redis {version} ({where})"


def drop_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every key of a bench or demo namespace."""
    pattern = f"{_glob_escaped(namespace)}:*"
    for chunk in chunks(client.scan_iter(match=pattern, count=1000), 500):
        client.unlink(*chunk)


def _glob_escaped(text: str) -> str:
    """`text` as a SCAN MATCH pattern that matches only itself."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)
