"""The archive's models/ folder: each checkpoint as v<N>.safetensors and v<N>.json, created
once and never replaced.

The weights are written before the publish script runs, the metadata under a hidden name
(.v<N>.json.unpublished) that is linked to v<N>.json only once the script said `published`:
a trainer killed in between leaves files that listings and rollback ignore.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from negcase.store.files import fsync_folder, write_atomic

log = logging.getLogger(__name__)

UNPUBLISHED_SUFFIX = ".unpublished"
# Any file of a version in models/: final, unpublished metadata, or a temp file.
_VERSION_FILE = re.compile(r"^\.?v(\d+)\.")


class ArchiveConflict(FileExistsError):
    """The archive already has a file for the version being published; it is never replaced
    (two lineages writing one models/ folder, or a version counter that went backwards)."""


class ModelFiles:
    """The checkpoint files in one models/ folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def newest_version(self) -> int:
        """The highest version any file in the folder belongs to (0 when none)."""
        found = (_VERSION_FILE.match(name) for name in os.listdir(self.folder))
        return max((int(match[1]) for match in found if match), default=0)

    def write_unpublished(
        self, version: int, weights: bytes, sha256: str, meta: dict[str, Any]
    ) -> None:
        """Write the weights and the not-yet-published metadata; ArchiveConflict if either
        exists already (nothing is overwritten, and what this call made is removed)."""
        meta_json = orjson.dumps(
            {**meta, "sha256": sha256}, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        files = [(self._weights(version), weights), (self._unpublished(version), meta_json)]
        created: list[Path] = []
        for path, data in files:
            try:
                write_atomic(path, data, replace=False)
            except FileExistsError:
                for made in created:
                    made.unlink()
                raise ArchiveConflict(
                    f"{path} exists: the archive already has checkpoint v{version} "
                    f"and it is never replaced (is another lineage writing {self.folder}?)"
                ) from None
            created.append(path)

    def confirm(self, version: int) -> None:
        """Give a published version's metadata its final name, which listings trust."""
        unpublished = self._unpublished(version)
        try:
            os.link(unpublished, self._meta(version))  # link(): never replaces
        except FileExistsError:
            # Published all the same; the caller's update is in. Say so, keep both files.
            log.warning(
                "%s exists; published v%d's metadata stays in %s",
                self._meta(version),
                version,
                unpublished.name,
            )
            return
        except FileNotFoundError:
            log.warning("v%d is published but its archived metadata is gone", version)
            return
        unpublished.unlink()
        fsync_folder(self.folder)

    def discard(self, version: int) -> None:
        """Remove the files of a version that was never published."""
        for path in (self._weights(version), self._unpublished(version)):
            path.unlink(missing_ok=True)

    def unpublished_versions(self, min_age_s: float) -> list[int]:
        """Versions whose metadata is still unpublished, written at least `min_age_s` ago."""
        now = time.time()
        found = []
        for path in self.folder.glob(f".v*.json{UNPUBLISHED_SUFFIX}"):
            version = path.name[2:].split(".", 1)[0]
            with contextlib.suppress(FileNotFoundError):
                if version.isdigit() and now - path.stat().st_mtime >= min_age_s:
                    found.append(int(version))
        return sorted(found)

    def read(self, version: int) -> tuple[dict[str, Any], bytes] | None:
        """A published version's metadata (with its sha256) and weights, or None."""
        try:
            meta = orjson.loads(self._meta(version).read_bytes())
            weights = self._weights(version).read_bytes()
        except FileNotFoundError:
            return None
        return meta, weights

    def metas(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(version, metadata) of every published version, in no particular order."""
        for path in self.folder.glob("v*.json"):
            version = path.stem[1:]
            if version.isdigit():
                yield int(version), orjson.loads(path.read_bytes())

    def _weights(self, version: int) -> Path:
        return self.folder / f"v{version}.safetensors"

    def _meta(self, version: int) -> Path:
        return self.folder / f"v{version}.json"

    def _unpublished(self, version: int) -> Path:
        return self.folder / f".v{version}.json{UNPUBLISHED_SUFFIX}"
