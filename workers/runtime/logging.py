"""Diagnostics: every process logs through the standard `logging` module to stderr, with a
timestamp and a level, as text for people or as one JSON object a line for log shippers.

Command output meant for people or pipes (tables, JSON answers) stays on stdout via print.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

from negcase.runtime.settings import Settings
from negcase.store.connection import redacted

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# The attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC), level, logger, message, and any
    `extra=` fields given to the call."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _iso_utc(created_s: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created_s))
    return f"{stamp}.{int(created_s % 1 * 1000):03d}Z"


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send every `negcase.*` logger's records at `level` and above to stderr, formatted as
    `log_format` ('text' or 'json'). Calling it again replaces the previous setup."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger("negcase")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Records stop here: an embedding program's root handlers must not print them twice.
    root.propagate = False


def log_startup(
    logger: logging.Logger,
    kind: str,
    settings: Settings,
    name: str,
    group: str | None = None,
) -> None:
    """The first line a worker logs: where it works (Redis URL without its password,
    namespace, consumer group), under which name, and every setting that is not the
    default, so that a log alone says how the worker was configured."""
    changed = {
        key: value
        for key, value in settings.differences().items()
        if key not in ("redis_url", "namespace")
    }
    url = redacted(settings.redis_url or "redis://127.0.0.1:6379/0")
    where = f"namespace {settings.namespace}" + (f", group {group}" if group else "")
    shown = ", ".join(f"{key}={_shown(value)}" for key, value in changed.items()) or "none"
    logger.info(
        "%s %s starting on %s, %s; settings not at their default: %s",
        kind,
        name,
        url,
        where,
        shown,
        extra={
            "worker": name,
            "kind": kind,
            "redis_url": url,
            "namespace": settings.namespace,
            "group": group,
        },
    )


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return str(value)


class Progress:
    """Counts of work done, logged at INFO as one line per `every_s` at most: a busy
    worker says what it did every few seconds instead of once per batch, a quiet one says
    so as soon as it does something. `flush` logs what is left (on stop, or when idle)."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float = 10.0) -> None:
        self.logger = logger
        self.what = what
        self.every_s = every_s
        self.counts: dict[str, float] = {}
        self._last_s = -every_s

    def add(self, counts: Mapping[str, float]) -> None:
        """Count what one batch did, and log the totals since the last line if one is due."""
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Log the counts if something was counted and the last line is `every_s` old."""
        if self.counts and time.monotonic() - self._last_s >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Log the counts since the last line now, if there are any."""
        if not self.counts:
            return
        text = ", ".join(f"{_number(value)} {name}" for name, value in self.counts.items())
        self.logger.info("%s: %s", self.what, text, extra={"counts": dict(self.counts)})
        self.counts = {}
        self._last_s = time.monotonic()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
