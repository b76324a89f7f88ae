"""The on-disk archive under testcases/negative/: cases, sessions, models, case_index.json.

Every file is written whole (store/files.py: temp file in the same folder, data synced, then
named), so a reader never sees half a file. Cases are msgpack, sessions and metadata JSON: nothing
here is pickle, and nothing read back can run code.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from negcase.schemas.case import NegativeCase
from negcase.store.files import (
    fsync_folder,
    give_name,
    remove_stale_temps,
    sync_filesystem_of,
    temp_name,
    write_atomic,
)

INDEX_NAME = "case_index.json"
# Batches with more case files than this are synced with one syncfs instead of per file.
SYNCFS_FROM_FILES = 16


class Archive:
    """The archive folder: `cases/<case_id>.msgpack`, `case_index.json`, `sessions/`, `models/`.

    The case files are the record. `case_index.json` is a summary of them, rewritten at most
    every `index_interval_s` and on `flush_index()` (rewriting a growing file for every batch
    would make ingest slower the longer it runs); `reconcile_index()` catches it up with the
    case files after a crash.
    """

    def __init__(self, root: Path, index_interval_s: float = 1.0) -> None:
        self.root = Path(root)
        self.cases_dir = self.root / "cases"
        self.sessions_dir = self.root / "sessions"
        self.models_dir = self.root / "models"
        for folder in (self.cases_dir, self.sessions_dir, self.models_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.index_interval_s = index_interval_s
        self._index: dict[str, dict[str, Any]] = {}
        self._index_stamp: tuple[int, int, int] | None = None
        self._unindexed: dict[str, dict[str, Any]] = {}
        self._index_written_s = time.monotonic()
        self._syncer: ThreadPoolExecutor | None = None

    def case_path(self, case_id: str) -> Path:
        """Where a case's file lives."""
        return self.cases_dir / f"{case_id}.msgpack"

    def add_cases(self, cases: list[NegativeCase], blobs: list[bytes]) -> None:
        """Archive new cases; a case already archived keeps its first file.

        The files are made durable before they get their final names, so a crash leaves a
        whole case file or none.
        """
        if not cases:
            return
        first_of_each: dict[str, bytes] = {}
        for case, blob in zip(cases, blobs, strict=True):
            first_of_each.setdefault(case.case_id, blob)
        folder = str(self.cases_dir)
        temps, fds = [], []
        try:
            for case_id, blob in first_of_each.items():
                final = f"{folder}/{case_id}.msgpack"
                tmp = temp_name(final)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                fds.append(fd)
                os.write(fd, blob)
                temps.append((tmp, final))
            self._make_durable(fds)
        finally:
            for fd in fds:
                os.close(fd)
        for tmp, final in temps:
            # Never replaced: a redelivered trade never rewrites its case.
            with contextlib.suppress(FileExistsError):
                give_name(tmp, final, replace=False)
        fsync_folder(self.cases_dir)
        for case in cases:
            self._unindexed.setdefault(case.case_id, _index_entry(case))
        if time.monotonic() - self._index_written_s >= self.index_interval_s:
            self.flush_index()

    def _make_durable(self, fds: list[int]) -> None:
        """Sync a batch's files. A few: fdatasync each, in parallel (the journal commits them
        together), which waits for these files only. Many: one syncfs for all, far cheaper
        per file, though it also waits for whatever else is dirty on the filesystem (it was
        seen to take over a second behind another process's writes)."""
        if len(fds) > SYNCFS_FROM_FILES:
            sync_filesystem_of(self.cases_dir)
            return
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(SYNCFS_FROM_FILES, thread_name_prefix="fdatasync")
        list(self._syncer.map(os.fdatasync, fds))

    def remove_stale_temps(self) -> int:
        """Remove temp files killed writers left in the archive's folders (see
        store/files.py `remove_stale_temps`); returns how many."""
        folders = (self.root, self.cases_dir, self.sessions_dir, self.models_dir)
        return sum(remove_stale_temps(folder) for folder in folders)

    def replace_case(self, case: NegativeCase) -> None:
        """Store a newer state of a case (its retraining count, say) over the old file."""
        write_atomic(self.case_path(case.case_id), case.to_msgpack())
        self._unindexed[case.case_id] = _index_entry(case)
        if time.monotonic() - self._index_written_s >= self.index_interval_s:
            self.flush_index()

    def read_case(self, case_id: str) -> NegativeCase:
        """One archived case."""
        return NegativeCase.from_msgpack(self.case_path(case_id).read_bytes())

    def iter_cases(self) -> Iterator[NegativeCase]:
        """Every archived case, in file-name order."""
        for path in sorted(self.cases_dir.glob("*.msgpack")):
            yield NegativeCase.from_msgpack(path.read_bytes())

    def read_index(self) -> dict[str, dict[str, Any]]:
        """case_index.json as a dict of case id -> summary."""
        path = self.root / INDEX_NAME
        return orjson.loads(path.read_bytes()) if path.exists() else {}

    def write_json(self, folder: Path, name: str, data: Any) -> Path:
        """Write a JSON document (a session, a checkpoint's metadata) atomically."""
        path = folder / name
        write_atomic(path, orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        return path

    def flush_index(self) -> None:
        """Merge what this process archived into case_index.json, under a lock that other
        processes writing the same archive share."""
        self._index_written_s = time.monotonic()
        if not self._unindexed:
            return
        path = self.root / INDEX_NAME
        with open(self.root / f".{INDEX_NAME}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Re-read only when another process wrote since we last did.
            if _stamp(path) != self._index_stamp:
                self._index = self.read_index()
            self._index.update(self._unindexed)
            write_atomic(path, orjson.dumps(self._index, option=orjson.OPT_SORT_KEYS))
            self._index_stamp = _stamp(path)
        self._unindexed = {}

    def reconcile_index(self) -> int:
        """Index every case file the index misses (left by a process that was killed before
        its flush). Returns how many were added."""
        indexed = self.read_index()
        for path in self.cases_dir.glob("*.msgpack"):
            case_id = path.name.removesuffix(".msgpack")
            if case_id not in indexed and case_id not in self._unindexed:
                self._unindexed[case_id] = _index_entry(self.read_case(case_id))
        added = len(self._unindexed)
        self.flush_index()
        return added


def existing_archive(root: Path) -> Archive | None:
    """The archive at `root` when it has a models/ folder, else None: a reader that only
    looks for checkpoints never creates an archive where there was none."""
    return Archive(root) if (Path(root) / "models").is_dir() else None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _index_entry(case: NegativeCase) -> dict[str, Any]:
    return {
        "trade_id": case.trade_id,
        "symbol": case.symbol,
        "side": case.side,
        "training_priority": case.training_priority,
        "loss_percentage": case.loss_percentage,
        "loss_amount": case.loss_amount,
        "what_should_have_been_done": case.what_should_have_been_done,
        "created_at_ms": case.created_at_ms,
        "retraining_count": case.retraining_count,
        "file": f"cases/{case.case_id}.msgpack",
    }
