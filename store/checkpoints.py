"""The checkpoint registry: versioned safetensors blobs in Redis and on disk, `latest`, and the
announcement stream that inference workers follow.

Redis layout (DESIGN.md, "Checkpoints and hot reload"):
  <ns>:ckpt:<version>   hash: weights (safetensors bytes), sha256 (hex), meta (JSON object)
  <ns>:ckpt:latest      the version inference serves, a decimal string
  <ns>:ckpt:versions    sorted set of the versions still in Redis (score = version)
  <ns>:ckpt:counter     the highest version handed out (INCR), so versions only increase;
                        in an empty Redis it starts at the highest version the archive holds
  <ns>:ckpt:lock        held by the one trainer that rebases and publishes right now
  <ns>:checkpoints      stream: kind (published|rollback), version, parent_version, sha256, at_ms

Archive layout (models/): v<N>.safetensors and v<N>.json, each created once and never
replaced. The weights are written before the publish script runs, the metadata under a
hidden name (.v<N>.json.unpublished) that is renamed to v<N>.json only once the script said
`published`: a trainer killed in between leaves files that listings and rollback ignore.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
from redis.exceptions import LockError

from negcase.store.archive import Archive, fsync_folder
from negcase.store.keys import Keys
from negcase.store.queue import Lease, LeaseLost
from negcase.store.scripts import script

ANNOUNCEMENTS_MAXLEN = 10_000
UNPUBLISHED_SUFFIX = ".unpublished"
# Any file of a version in models/: final, unpublished metadata, or a temp file.
_VERSION_FILE = re.compile(r"^\.?v(\d+)\.")


class PublishConflict(Exception):
    """`latest` moved since the trainer read it: rebase onto `latest` and try again."""

    def __init__(self, latest: int | None) -> None:
        super().__init__(f"latest is now v{latest}")
        self.latest = latest


class CheckpointMissing(LookupError):
    """No checkpoint of that version, in Redis or in the archive."""


class ArchiveConflict(FileExistsError):
    """The archive already has a file for the version being published; it is never replaced
    (two lineages writing one models/ folder, or a version counter that went backwards)."""


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
        self._publish = script(client, "publish_checkpoint", "clock", "lease")
        self._rollback = script(client, "rollback_checkpoint", "clock")

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
        when a lease in `leases` is no longer held, ArchiveConflict when the archive already
        has files of the new version. Returns the new version."""
        self._start_counter_above_archive()
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
            self._confirm_archived(version)
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

    def _start_counter_above_archive(self) -> None:
        """Before the first INCR of an empty (or flushed) Redis, start the counter at the
        highest version the archive or Redis already used, so that no version number is
        handed out twice. SET NX: of publishers racing here, one sets it, all INCR after."""
        counter = self.keys.version_counter
        if self.client.exists(counter):
            return
        newest = self.client.zrevrange(self.keys.versions, 0, 0)
        used = [
            self._newest_archived(),
            self.latest_version() or 0,
            int(newest[0]) if newest else 0,
        ]
        if max(used) > 0:
            self.client.set(counter, max(used), nx=True)

    def _newest_archived(self) -> int:
        if self.archive is None:
            return 0
        found = (_VERSION_FILE.match(name) for name in os.listdir(self.archive.models_dir))
        return max((int(match[1]) for match in found if match), default=0)

    def _archive(self, version: int, weights: bytes, sha256: str, meta: dict[str, Any]) -> None:
        """Write the weights and the not-yet-published metadata; ArchiveConflict if either
        exists already (nothing is overwritten, and what this call made is removed)."""
        if self.archive is None:
            return
        folder = self.archive.models_dir
        meta_json = orjson.dumps(
            {**meta, "sha256": sha256}, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        created: list[Path] = []
        for name, data in ((f"v{version}.safetensors", weights),
                           (f".v{version}.json{UNPUBLISHED_SUFFIX}", meta_json)):  # fmt: skip
            try:
                _create_new(folder / name, data)
            except FileExistsError:
                for path in created:
                    path.unlink()
                raise ArchiveConflict(
                    f"{folder / name} exists: the archive already has checkpoint v{version} "
                    f"and it is never replaced (is another lineage writing {folder}?)"
                ) from None
            created.append(folder / name)
        fsync_folder(folder)

    def _confirm_archived(self, version: int) -> None:
        """Give a published version's metadata its final name, which listings trust."""
        if self.archive is None:
            return
        folder = self.archive.models_dir
        unpublished = folder / f".v{version}.json{UNPUBLISHED_SUFFIX}"
        try:
            os.link(unpublished, folder / f"v{version}.json")  # link(): never replaces
        except FileExistsError:
            # Published all the same; the caller's update is in. Say so, keep both files.
            print(f"warning: {folder}/v{version}.json exists; published v{version}'s "
                  f"metadata stays in {unpublished.name}", file=sys.stderr)  # fmt: skip
            return
        unpublished.unlink()
        fsync_folder(folder)

    def _unarchive(self, version: int) -> None:
        """Remove the files of a version that was never published."""
        if self.archive is None:
            return
        folder = self.archive.models_dir
        for name in (f"v{version}.safetensors", f".v{version}.json{UNPUBLISHED_SUFFIX}"):
            (folder / name).unlink(missing_ok=True)

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


def _create_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet: whole (temp file, fsync) and never over another
    (link() fails with FileExistsError where rename() would replace)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()
