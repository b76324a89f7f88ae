"""Writing files whole: the data goes to a temp file in the same folder, is synced, and only
then gets its final name, so a crash leaves the old file, the new one, or (for a file that
must not be replaced) none, never half of one."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def temp_name(final: str | Path) -> str:
    """A hidden name beside `final`, unique to this process, for writing it first."""
    folder, name = os.path.split(os.fspath(final))
    return f"{folder}/.{name}.{os.getpid()}.tmp"


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    give_name(tmp, path, replace)
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
