"""The checkpoint registry: versioned safetensors blobs in Redis and on disk, `latest`, and the
announcement stream that inference workers follow.

Redis layout (DESIGN.md, "Checkpoints and hot reload"):
  <ns>:ckpt:<version>   hash: weights (safetensors bytes), sha256 (hex), meta (JSON object)
  <ns>:ckpt:latest      the newest version of the lineage (trainers build on it), decimal
  <ns>:ckpt:versions    sorted set of the versions still in Redis (score = version)
  <ns>:ckpt:counter     the highest version handed out (INCR), so versions only increase;
                        in an empty Redis it starts at the highest version the archive holds
  <ns>:ckpt:lock        held by the one trainer that rebases and publishes right now
  <ns>:checkpoints      stream: kind (published, rollback, canary_started, promoted, retired,
                        deferred), version, previous_version, parent_version, sha256, epoch, at_ms

What serves (the version in service, a canary) is store/serving.py; `latest` is the head of
the lineage trainers build on, which a new version serves from only once serving says so.

The archive's models/ folder, where every version is kept, is store/model_files.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from redis.exceptions import LockError

from negcase.store.archive import Archive
from negcase.store.keys import Keys
from negcase.store.leases import Lease, LeaseLost
from negcase.store.model_files import ModelFiles
from negcase.store.partitions import CaseQueues
from negcase.store.replication import NO_ACKS, ReplicaAcks
from negcase.store.scripts import script

log = logging.getLogger(__name__)

ANNOUNCEMENTS_MAXLEN = 10_000
# The publish lock's TTL. Its holder renews it every third of that, so the lock outlives a
# holder that was killed or cut off from Redis by these few seconds at most, however long
# the rebase, the archive's fsyncs and the publish take.
PUBLISH_LOCK_TTL_S = 5.0
# An unpublished metadata file older than this has no publish in flight: its trainer was
# killed between archiving and publishing, or it lost the publish reply.
UNPUBLISHED_STALE_S = 60.0


class PublishConflict(Exception):
    """`latest` moved since the trainer read it: rebase onto `latest` and try again."""

    def __init__(self, latest: int | None) -> None:
        super().__init__(f"latest is now v{latest}")
        self.latest = latest


class CheckpointMissing(LookupError):
    """No checkpoint of that version, in Redis or in the archive."""


class WeightsRefused(ValueError):
    """Weights that are never published: not safetensors, or holding NaN or infinity (no
    worker could load them, and every trainer builds on latest)."""


def weights_problem(weights: bytes) -> str | None:
    """Why `weights` must not be published (not safetensors, or a tensor holding NaN or
    infinity), or None when they may."""
    # Imported here: the cheap commands (status, tail, health) read this module and must
    # not pay for numpy.
    import numpy as np
    import safetensors.numpy

    try:
        tensors = safetensors.numpy.load(weights)
    except Exception as error:  # safetensors raises its own SafetensorError and others
        return f"not safetensors ({error})"
    for name, tensor in tensors.items():
        if not np.isfinite(tensor).all():
            return f"{name} holds NaN or infinity"
    return None


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
        queues: CaseQueues | None = None,
        learned_window_ms: int = 86_400_000,
    ) -> None:
        self.client = client
        self.keys = keys
        # With more than one partition, a publish finishes its cases in their partitions
        # (store/partitions.py), recording them in `learned` for learned_window_ms.
        self.queues = queues if queues is not None and queues.partitioned else None
        self.learned_window_ms = learned_window_ms
        self.files = None if archive is None else ModelFiles(archive.models_dir)
        self.keep = max(1, keep)
        self.events_maxlen = events_maxlen
        self.acks = acks
        # Versions whose publish reply was lost: settled once Redis answers (settle_pending).
        self._unsettled: set[int] = set()
        self._publish = script(client, "publish_checkpoint", "clock", "lease", "store_checkpoint")
        self._publish_learned = script(client, "publish_learned", "clock", "store_checkpoint")
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
    def publish_lock(self, wait_s: float = 120.0) -> Iterator[None]:
        """Hold the publish lock: one trainer at a time rebases and publishes, so versions
        follow each other without gaps. Its TTL is short (PUBLISH_LOCK_TTL_S) and a thread
        renews it while it is held. The compare-and-set in `publish` stays the guard for a
        holder whose lock expired while it was paused."""
        # thread_local=False: the renewing thread must see the token the acquirer got.
        lock = self.client.lock(
            self.keys.publish_lock,
            timeout=PUBLISH_LOCK_TTL_S,
            sleep=0.01,
            blocking_timeout=wait_s,
            thread_local=False,
        )
        if not lock.acquire():
            raise TimeoutError(f"publish lock busy for {wait_s}s")
        held = threading.Event()
        renewer = threading.Thread(
            target=_renew, args=(lock, held), name="publish-lock", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            held.set()
            renewer.join()
            # It may have expired while we held it; the CAS in publish kept things safe.
            with contextlib.suppress(LockError, redis.RedisError):
                lock.release()

    def publish(
        self,
        weights: bytes,
        sha256: str,
        meta: dict[str, Any],
        parent_version: int | None,
        leases: Sequence[Lease] = (),
        trainer: str = "",
        blobs: Mapping[str, bytes] | None = None,
    ) -> int:
        """Store, archive and announce a checkpoint built on `parent_version`, move latest to
        it, and finish the leased cases with their updated `blobs`, in one step. Raises
        WeightsRefused (nothing is written), PublishConflict when latest is no longer
        `parent_version`, LeaseLost when a lease in `leases` is no longer held,
        ArchiveConflict when the archive already has files of the new version,
        ReplicaAcksMissing when it stands on the primary but too few replicas confirmed it
        (its files stay unconfirmed). Returns the new version."""
        problem = weights_problem(weights)
        if problem is not None:
            raise WeightsRefused(f"weights never published: {problem}")
        blobs = blobs or {}
        if self.queues is not None:
            # Fencing before anything is written: the publish script cannot see the leases.
            lost = self.queues.heartbeat(leases)
            if lost:
                raise LeaseLost(lost[0])
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
        try:
            if self.queues is None:
                status, detail = self._publish_finishing(
                    version,
                    weights,
                    sha256,
                    meta_json,
                    parent_version,
                    leases,
                    trainer,
                    blobs,
                    stale,
                )
            else:
                status, detail = self._publish_recording(
                    version, weights, sha256, meta_json, parent_version, leases, trainer, stale
                )
        except (redis.ConnectionError, redis.TimeoutError):
            # Whether it was published is known once Redis answers again: settle_pending().
            self._unsettled.add(version)
            raise
        if self.files is not None:
            if status == b"published":
                self.files.confirm(version)
            else:
                self.files.discard(version)
        if status == b"published":
            if self.queues is not None:
                self._finish_learned(leases, blobs)
            return version
        if status == b"conflict":
            raise PublishConflict(version_of(detail))
        if status == b"learned" and self.queues is not None:
            self._drop_learned(leases, detail.decode(), trainer)
        raise LeaseLost(detail.decode())

    def _publish_finishing(
        self,
        version: int,
        weights: bytes,
        sha256: str,
        meta_json: bytes,
        parent_version: int | None,
        leases: Sequence[Lease],
        trainer: str,
        blobs: Mapping[str, bytes],
        stale: Sequence[int],
    ) -> tuple[bytes, bytes]:
        """One partition: publish and finish the leased cases in one script."""
        fences: list[str | int | bytes] = []
        for lease in leases:
            fences += [lease.case_id, lease.token, blobs.get(lease.case_id, b"")]
        keys = self.keys
        head = self._checkpoint_args(version, weights, sha256, meta_json, parent_version, trainer)
        status, detail = self.acks.run_script(
            self.client,
            self._publish,
            keys=[
                *self._checkpoint_keys(version),
                keys.leased,
                keys.leases,
                keys.version_counter,
                keys.done,
                keys.attempts,
                keys.rejected,
                keys.retire,
                *(keys.case(lease.case_id) for lease in leases),
                *(keys.checkpoint(old) for old in stale),
            ],
            args=[
                *head,
                len(leases),
                *fences,
                *stale,
            ],
        )
        return status, detail

    def _publish_recording(
        self,
        version: int,
        weights: bytes,
        sha256: str,
        meta_json: bytes,
        parent_version: int | None,
        leases: Sequence[Lease],
        trainer: str,
        stale: Sequence[int],
    ) -> tuple[bytes, bytes]:
        """Several partitions: publish and record the cases in `learned`, in the lineage's
        slot; the caller finishes them in their partitions."""
        keys = self.keys
        head = self._checkpoint_args(version, weights, sha256, meta_json, parent_version, trainer)
        status, detail = self.acks.run_script(
            self.client,
            self._publish_learned,
            keys=[
                *self._checkpoint_keys(version),
                keys.version_counter,
                keys.learned,
                *(keys.checkpoint(old) for old in stale),
            ],
            args=[
                *head,
                self.learned_window_ms,
                len(leases),
                *(lease.case_id for lease in leases),
                *stale,
            ],
        )
        return status, detail

    def _checkpoint_keys(self, version: int) -> list[str]:
        """KEYS 1-5 of both publish scripts and of the rollback script: latest, the version's
        checkpoint hash, the versions index, the checkpoints stream, events."""
        keys = self.keys
        return [
            keys.latest,
            keys.checkpoint(version),
            keys.versions,
            keys.checkpoints,
            keys.events,
        ]

    def _checkpoint_args(
        self,
        version: int,
        weights: bytes,
        sha256: str,
        meta_json: bytes,
        parent_version: int | None,
        trainer: str,
    ) -> list[str | int | bytes]:
        """ARGV 1-9 of both publish scripts: the expected latest, then what
        store_checkpoint.lua stores and announces."""
        parent: str | int = "" if parent_version is None else parent_version
        return [
            parent,
            version,
            parent,
            weights,
            sha256,
            meta_json,
            ANNOUNCEMENTS_MAXLEN,
            self.events_maxlen,
            trainer,
        ]

    def _finish_learned(self, leases: Sequence[Lease], blobs: Mapping[str, bytes]) -> None:
        """Finish the published cases in their partitions. A lease lost since the check is
        left to the reaper, which finishes its case as learned."""
        assert self.queues is not None
        try:
            self.queues.ack(leases, blobs)
        except LeaseLost as error:
            log.warning("published, but %s; the reaper finishes it as learned", error)

    def _drop_learned(self, leases: Sequence[Lease], case_id: str, trainer: str) -> None:
        """An earlier checkpoint learned `case_id`: finish it, hand the others back."""
        assert self.queues is not None
        learned = [lease for lease in leases if lease.case_id == case_id]
        self.queues.ack(learned)
        self.queues.release([lease for lease in leases if lease.case_id != case_id], trainer)

    def settle_pending(self) -> None:
        """Name the archive files of versions whose publish reply was lost by what Redis
        says now: published (metadata made final) or not (files removed)."""
        for version in sorted(self._unsettled):
            self._settle(version)
            self._unsettled.discard(version)

    def has_unpublished(self, min_age_s: float = UNPUBLISHED_STALE_S) -> bool:
        """Whether the archive holds unpublished versions older than `min_age_s`."""
        return self.files is not None and bool(self.files.unpublished_versions(min_age_s))

    def settle_unpublished(self, min_age_s: float = UNPUBLISHED_STALE_S) -> int:
        """Settle every unpublished version in the archive older than `min_age_s` (a
        trainer killed between archiving and its publish reply left it). Returns how many
        were settled. Run it under the publish lock: no publish is then in flight."""
        if self.files is None:
            return 0
        return sum(self._settle(v) for v in self.files.unpublished_versions(min_age_s))

    def _settle(self, version: int) -> bool:
        """Confirm or remove one unpublished version's files; False when Redis cannot tell
        (the version is older than every one it keeps, so it may have been trimmed)."""
        if self.files is None:
            return True
        if self.client.exists(self.keys.checkpoint(version)):
            self.files.confirm(version)
            return True
        oldest = self.client.zrange(self.keys.versions, 0, 0)
        if not oldest or version > int(oldest[0]):
            # Every version published after the oldest kept is still in Redis: not this one.
            self.files.discard(version)
            return True
        log.warning(
            "v%d: unpublished metadata kept; Redis no longer tells whether it was published",
            version,
        )
        return False

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
                *self._checkpoint_keys(version),
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


def _renew(lock: Any, held: threading.Event) -> None:
    """Renew the publish lock every third of its TTL until `held` is set or it is lost."""
    while not held.wait(PUBLISH_LOCK_TTL_S / 3):
        try:
            lock.reacquire()
        except LockError:
            return  # expired and taken: the compare-and-set in publish still guards
        except redis.RedisError:
            continue  # Redis away: try again; if it stays away, the lock expires
