"""The checkpoint registry: versioned safetensors blobs in Redis and on disk, `latest`, and the
announcement stream that inference workers follow.

Redis layout (DESIGN.md, "Checkpoints and hot reload"):
  <ns>:ckpt:<version>   hash: weights (safetensors bytes), sha256 (hex), meta (JSON object)
  <ns>:ckpt:latest      the newest version of the lineage (trainers build on it), decimal
  <ns>:ckpt:versions    sorted set of the versions still in Redis (score = version)
  <ns>:ckpt:counter     the highest version handed out (INCR), so versions only increase;
                        in an empty Redis it starts at the highest version the archive holds
  <ns>:ckpt:lock        held by the one trainer that rebases and publishes right now
  <ns>:checkpoints      stream: kind (published, rollback, canary_started, promoted, retired),
                        version, previous_version, parent_version, sha256, epoch, at_ms

What serves (the version in service, a canary) is store/serving.py; `latest` is the head of
the lineage trainers build on, which a new version serves from only once serving says so.

The archive's models/ folder, where every version is kept, is store/model_files.py.
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

from negcase.store.archive import Archive
from negcase.store.keys import Keys
from negcase.store.leases import Lease, LeaseLost, fence_args
from negcase.store.model_files import ModelFiles
from negcase.store.replication import NO_ACKS, ReplicaAcks
from negcase.store.scripts import script

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


def version_of(raw: bytes | str | None) -> int | None:
    """A version as Redis or a script reply holds it (decimal text), or None when unset."""
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
        acks: ReplicaAcks = NO_ACKS,
    ) -> None:
        self.client = client
        self.keys = keys
        self.files = None if archive is None else ModelFiles(archive.models_dir)
        self.keep = max(1, keep)
        self.events_maxlen = events_maxlen
        self.acks = acks
        self._publish = script(client, "publish_checkpoint", "clock", "lease")
        self._rollback = script(client, "rollback_checkpoint", "clock")

    def latest_version(self) -> int | None:
        """The version `latest` points at, or None before the first publish."""
        return version_of(self.client.get(self.keys.latest))

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
        when a lease in `leases` is no longer held, ArchiveConflict when the archive already
        has files of the new version, ReplicaAcksMissing when it stands on the primary but
        too few replicas confirmed it (its files stay unconfirmed). Returns the new version."""
        version = self._next_version()
        full_meta = {
            **meta,
            "version": version,
            "parent_version": parent_version,
            "created_at_ms": int(time.time() * 1000),
        }
        meta_json = orjson.dumps(full_meta)
        if self.files is not None:
            self.files.write_unpublished(version, weights, sha256, full_meta)
        stale = self._stale_versions()
        status, detail = self.acks.run_script(
            self.client,
            self._publish,
            keys=[
                self.keys.latest,
                self.keys.checkpoint(version),
                self.keys.versions,
                self.keys.checkpoints,
                self.keys.events,
                self.keys.leased,
                self.keys.leases,
                self.keys.version_counter,
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
                *fence_args(leases),
                *stale,
            ],
        )
        if self.files is not None:
            if status == b"published":
                self.files.confirm(version)
            else:
                self.files.discard(version)
        if status == b"published":
            return version
        if status == b"conflict":
            raise PublishConflict(version_of(detail))
        raise LeaseLost(detail.decode())

    def rollback(self, version: int) -> int | None:
        """Put `version` in service and point latest at it (restored from the archive when
        Redis trimmed it), cancelling any canary, and announce it. Returns the version latest
        pointed at before."""
        stored = self.fetch(version)
        restore = None if stored else self._read_archived(version)
        meta = (stored or restore).meta
        parent = meta.get("parent_version")
        status, previous = self.acks.run_script(
            self.client,
            self._rollback,
            keys=[
                self.keys.latest,
                self.keys.checkpoint(version),
                self.keys.versions,
                self.keys.checkpoints,
                self.keys.events,
                self.keys.serving,
                self.keys.serving_history,
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
        return version_of(previous)

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
        for version, meta in self.files.metas() if self.files is not None else ():
            if version not in infos:
                infos[version] = CheckpointInfo(version, meta, meta.get("sha256", ""), False)
        return [infos[version] for version in sorted(infos)]

    def _stale_versions(self) -> list[int]:
        """Versions to drop from Redis once one more is added: all but the newest keep - 1,
        except those serving may need (in service, canary, or in the history a rollback goes
        back to): a version whose blob is gone can no longer be loaded."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrevrange(self.keys.versions, self.keep - 1, -1)
        pipe.hmget(self.keys.serving, ["service", "canary"])
        pipe.lrange(self.keys.serving_history, 0, -1)
        old, serving, history = pipe.execute()
        needed = {int(v) for v in (*serving, *history) if v}
        return [int(v) for v in old if int(v) not in needed]

    def _next_version(self) -> int:
        """A version number never handed out before: INCR, and past the newest version the
        archive holds. A failover can lose INCRs the archive saw (a publish cut short with
        the old primary); without this the next publish would reuse its number."""
        self._start_counter_above_archive()
        version = int(self.client.incr(self.keys.version_counter))
        newest = 0 if self.files is None else self.files.newest_version()
        if version <= newest:
            version = int(self.client.incrby(self.keys.version_counter, newest + 1 - version))
        return version

    def _start_counter_above_archive(self) -> None:
        """Before the first INCR of an empty (or flushed) Redis, start the counter at the
        highest version the archive or Redis already used, so that no version number is
        handed out twice. SET NX: of publishers racing here, one sets it, all INCR after."""
        counter = self.keys.version_counter
        if self.client.exists(counter):
            return
        newest = self.client.zrevrange(self.keys.versions, 0, 0)
        used = [
            0 if self.files is None else self.files.newest_version(),
            self.latest_version() or 0,
            int(newest[0]) if newest else 0,
        ]
        if max(used) > 0:
            self.client.set(counter, max(used), nx=True)

    def _read_archived(self, version: int) -> StoredCheckpoint:
        found = None if self.files is None else self.files.read(version)
        if found is None:
            raise CheckpointMissing(f"no checkpoint v{version} in Redis or in the archive")
        meta, weights = found
        sha256 = meta.pop("sha256", "")
        return StoredCheckpoint(version, meta, weights, sha256)
