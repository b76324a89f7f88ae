"""Writing files whole: the data goes to a temp file in the same folder, is synced, and only
then gets its final name, so a crash leaves the old file, the new one, or (for a file that
must not be replaced) none, never half of one."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_HOST = socket.gethostname()
# A temp file no live writer still holds: its writer was killed (or it is this old).
STALE_TEMP_S = 600.0


def temp_name(final: str | Path) -> str:
    """A hidden name beside `final`, unique to this process, for writing it first. It names
    the host and the pid, so a sweep can tell a killed writer's leftovers."""
    folder, name = os.path.split(os.fspath(final))
    return f"{folder}/.{name}.{_HOST}.{os.getpid()}.tmp"


def remove_stale_temps(folder: Path, max_age_s: float = STALE_TEMP_S) -> int:
    """Remove temp files in `folder` left by writers that died: those of this host whose
    process is gone, and any older than `max_age_s` (another host's, on a shared folder).
    Returns how many were removed."""
    removed = 0
    now = time.time()
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            head, _, pid = name.removesuffix(".tmp").rpartition(".")
            mine = head.endswith(f".{_HOST}") and pid.isdigit()
            with contextlib.suppress(FileNotFoundError):
                if (mine and not _alive(int(pid))) or now - entry.stat().st_mtime > max_age_s:
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def give_name(tmp: str, final: str | Path, replace: bool) -> None:
    """Give a synced temp file its final name. With `replace`, over any file there (rename);
    without, never over one: FileExistsError, since link() fails where rename() would
    replace. The temp name is gone either way."""
    if replace:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    finally:
        os.unlink(tmp)


def write_atomic(path: Path, data: bytes, replace: bool = True) -> None:
    """Write `data` to `path` whole and durably; without `replace`, FileExistsError when
    `path` exists (and nothing is written)."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        give_name(tmp, path, replace)
    except OSError:
        # A full disk, a lost folder, a folder where the file was: no temp file is left.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (a rename, a link, an unlink) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem_of(folder: Path) -> None:
    """Make every file written so far under `folder`'s filesystem durable, in one call.

    One syncfs(2) per batch costs about what one fsync does, where an fsync per case file
    would cost a disk flush each.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
