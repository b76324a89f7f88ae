"""Event: one entry on `<ns>:events`, flat text fields so plain redis-cli can read it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EVENT_TYPES = (
    "case_added",
    "training_started",
    "training_completed",
    "checkpoint_published",
    "checkpoint_loaded",
    "checkpoint_rejected",
    "dead_lettered",
    "lease_expired",
    "case_dead",
    "rollback",
)


@dataclass(slots=True)
class Event:
    """Something that happened: a type, when (ms, Redis time for scripts), and details."""

    type: str
    at_ms: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        """Stream fields: `type`, `at_ms`, then each detail as text."""
        flat = {"type": self.type, "at_ms": str(self.at_ms)}
        for name, value in self.details.items():
            if value is not None:
                flat[name] = value if type(value) is str else _text(value)
        return flat

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str]) -> Event:
        """Read an entry back; unknown fields become details, as text."""
        text = {_str(k): _str(v) for k, v in fields.items()}
        event_type = text.pop("type", "unknown")
        at_ms = int(text.pop("at_ms", "0") or 0)
        return cls(type=event_type, at_ms=at_ms, details=dict(text))


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
