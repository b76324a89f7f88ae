"""The checkpoint registry: versioned safetensors blobs in Redis and on disk, `latest`, and the
announcement stream that inference workers follow.

Redis layout (DESIGN.md, "Checkpoints and hot reload"):
  <ns>:ckpt:<version>   hash: weights (safetensors bytes), sha256 (hex), meta (JSON object)
  <ns>:ckpt:latest      the version inference serves, a decimal string
  <ns>:ckpt:versions    sorted set of the versions still in Redis (score = version)
  <ns>:ckpt:counter     the highest version handed out (INCR), so versions only increase
  <ns>:ckpt:lock        held by the one trainer that rebases and publishes right now
  <ns>:checkpoints      stream: kind (published|rollback), version, parent_version, sha256, at_ms
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.exceptions import LockError

from store.archive import Archive, write_atomic
from store.keys import Keys
from store.queue import Lease, LeaseLost
from store.scripts import script

ANNOUNCEMENTS_MAXLEN = 10_000


class PublishConflict(Exception):
    """`latest` moved since the trainer read it: rebase onto `latest` and try again."""

    def __init__(self, latest: int | None) -> None:
        super().__init__(f"latest is now v{latest}")
        self.latest = latest


class CheckpointMissing(LookupError):
    """No checkpoint of that version, in Redis or in the archive."""


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """One checkpoint as stored: its version, metadata, safetensors bytes and their sha256."""

    version: int
    meta: dict[str, Any]
    weights: bytes
    sha256: str


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A checkpoint's metadata for listings, and whether its blob is still in Redis."""

    version: int
    meta: dict[str, Any]
    sha256: str
    in_redis: bool


def _int_or_none(raw: bytes | str | None) -> int | None:
    return None if raw in (None, b"", "") else int(raw)


class CheckpointRegistry:
    """Versions in Redis (the last `keep` of them) and in the archive's models/ folder."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        archive: Archive | None = None,
        keep: int = 10,
        events_maxlen: int = 100_000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.archive = archive
        self.keep = max(1, keep)
        self.events_maxlen = events_maxlen
        self._publish = script(client, "publish_checkpoint")
        self._rollback = script(client, "rollback_checkpoint")

    def latest_version(self) -> int | None:
        """The version `latest` points at, or None before the first publish."""
        return _int_or_none(self.client.get(self.keys.latest))

    def fetch(self, version: int) -> StoredCheckpoint | None:
        """A checkpoint from Redis (unverified), or None when it is not there."""
        weights, sha256, meta = self.client.hmget(
            self.keys.checkpoint(version), ["weights", "sha256", "meta"]
        )
        if weights is None or sha256 is None or meta is None:
            return None
        return StoredCheckpoint(version, orjson.loads(meta), weights, sha256.decode())

    def fetch_latest(self) -> StoredCheckpoint | None:
        """The checkpoint `latest` points at, or None before the first publish."""
        # Between GET and HMGET another publish may move latest and trim the one we read;
        # reading latest again finds the newer one.
        for _ in range(5):
            version = self.latest_version()
            if version is None:
                return None
            stored = self.fetch(version)
            if stored is not None:
                return stored
        raise CheckpointMissing(f"latest points at v{version}, which is not in Redis")

    @contextmanager
    def publish_lock(self, timeout_s: float = 15.0, wait_s: float = 120.0) -> Iterator[None]:
        """Hold the publish lock: one trainer at a time rebases and publishes, so versions
        follow each other without gaps. The compare-and-set in `publish` stays the guard
        for a holder whose lock expired while it was paused."""
        lock = self.client.lock(
            self.keys.publish_lock, timeout=timeout_s, sleep=0.01, blocking_timeout=wait_s
        )
        if not lock.acquire():
            raise TimeoutError(f"publish lock busy for {wait_s}s")
        try:
            yield
        finally:
            # It may have expired while we held it; the CAS in publish kept things safe.
            with contextlib.suppress(LockError):
                lock.release()

    def publish(
        self,
        weights: bytes,
        sha256: str,
        meta: dict[str, Any],
        parent_version: int | None,
        leases: Sequence[Lease] = (),
        trainer: str = "",
    ) -> int:
        """Store, archive and announce a checkpoint built on `parent_version`, and move latest
        to it. Raises PublishConflict when latest is no longer `parent_version`, LeaseLost
        when a lease in `leases` is no longer held. Returns the new version."""
        version = int(self.client.incr(self.keys.version_counter))
        full_meta = {
            **meta,
            "version": version,
            "parent_version": parent_version,
            "created_at_ms": int(time.time() * 1000),
        }
        meta_json = orjson.dumps(full_meta)
        self._archive(version, weights, sha256, full_meta)
        stale = self._stale_versions()
        fences = [part for lease in leases for part in (lease.case_id, lease.token)]
        status, detail = self._publish(
            keys=[
                self.keys.latest,
                self.keys.checkpoint(version),
                self.keys.versions,
                self.keys.checkpoints,
                self.keys.events,
                self.keys.leased,
                self.keys.leases,
                *(self.keys.checkpoint(old) for old in stale),
            ],
            args=[
                "" if parent_version is None else parent_version,
                version,
                "" if parent_version is None else parent_version,
                weights,
                sha256,
                meta_json,
                ANNOUNCEMENTS_MAXLEN,
                self.events_maxlen,
                trainer,
                len(leases),
                *fences,
                *stale,
            ],
        )
        if status == b"published":
            return version
        self._unarchive(version)
        if status == b"conflict":
            raise PublishConflict(_int_or_none(detail))
        raise LeaseLost(detail.decode())

    def rollback(self, version: int) -> int | None:
        """Point latest at `version` (restored from the archive when Redis trimmed it) and
        announce it. Returns the version latest pointed at before."""
        stored = self.fetch(version)
        restore = None if stored else self._read_archived(version)
        meta = (stored or restore).meta
        parent = meta.get("parent_version")
        status, previous = self._rollback(
            keys=[
                self.keys.latest,
                self.keys.checkpoint(version),
                self.keys.versions,
                self.keys.checkpoints,
                self.keys.events,
            ],
            args=[
                version,
                "" if parent is None else parent,
                ANNOUNCEMENTS_MAXLEN,
                self.events_maxlen,
                restore.weights if restore else "",
                restore.sha256 if restore else "",
                orjson.dumps(restore.meta) if restore else "",
            ],
        )
        if status == b"missing":
            raise CheckpointMissing(f"v{version} was trimmed from Redis while rolling back")
        return _int_or_none(previous)

    def fetch_anywhere(self, version: int) -> StoredCheckpoint:
        """A version from Redis, else from the archive; CheckpointMissing if neither has it."""
        return self.fetch(version) or self._read_archived(version)

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint known, oldest first: those in Redis, then those only archived."""
        versions = [int(v) for v in self.client.zrange(self.keys.versions, 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        for version in versions:
            pipe.hmget(self.keys.checkpoint(version), ["meta", "sha256"])
        infos = {
            version: CheckpointInfo(version, orjson.loads(meta), sha256.decode(), True)
            for version, (meta, sha256) in zip(versions, pipe.execute(), strict=True)
            if meta is not None
        }
        for version, meta in self._archived_metas():
            if version not in infos:
                infos[version] = CheckpointInfo(version, meta, meta.get("sha256", ""), False)
        return [infos[version] for version in sorted(infos)]

    def _stale_versions(self) -> list[int]:
        """Versions to drop from Redis once one more is added: all but the newest keep - 1."""
        return [int(v) for v in self.client.zrevrange(self.keys.versions, self.keep - 1, -1)]

    def _archive(self, version: int, weights: bytes, sha256: str, meta: dict[str, Any]) -> None:
        if self.archive is None:
            return
        folder = self.archive.models_dir
        write_atomic(folder / f"v{version}.safetensors", weights)
        self.archive.write_json(folder, f"v{version}.json", {**meta, "sha256": sha256})

    def _unarchive(self, version: int) -> None:
        """Remove the files of a version that was never published."""
        if self.archive is None:
            return
        for suffix in (".safetensors", ".json"):
            (self.archive.models_dir / f"v{version}{suffix}").unlink(missing_ok=True)

    def _read_archived(self, version: int) -> StoredCheckpoint:
        missing = CheckpointMissing(f"no checkpoint v{version} in Redis or in the archive")
        if self.archive is None:
            raise missing
        folder = self.archive.models_dir
        try:
            meta = orjson.loads((folder / f"v{version}.json").read_bytes())
            weights = (folder / f"v{version}.safetensors").read_bytes()
        except FileNotFoundError:
            raise missing from None
        sha256 = meta.pop("sha256", "")
        return StoredCheckpoint(version, meta, weights, sha256)

    def _archived_metas(self) -> Iterator[tuple[int, dict[str, Any]]]:
        if self.archive is None:
            return
        for path in self.archive.models_dir.glob("v*.json"):
            version = path.stem[1:]
            if version.isdigit():
                yield int(version), orjson.loads(path.read_bytes())
