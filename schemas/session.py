"""TrainingSession: one intensive training run of a trainer on the cases it claimed."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

# How a session ended. Only "published" moved `latest`; "rejected" means the validation gate
# refused the update (the cases are done-but-rejected); "lease_lost" means another worker
# owns the cases now; "interrupted" means the trainer was stopped and handed them back;
# "cut_off" means Redis went away mid-session (the trainer closes it once Redis is back);
# "abandoned" means its trainer stopped beating (killed, or cut off for longer than a
# lease) and a reaper closed it: its cases were reaped like any expired lease.
OUTCOMES = ("published", "rejected", "lease_lost", "interrupted", "failed", "cut_off", "abandoned")
# How each outcome reads in logs and `negcase tail`: only a published session completed.
_HEADLINES = {
    "published": "INTENSIVE TRAINING COMPLETED",
    "rejected": "TRAINING REJECTED BY THE GATE",
    "interrupted": "TRAINING INTERRUPTED",
    "lease_lost": "TRAINING ABANDONED (lease lost)",
    "failed": "TRAINING FAILED",
    "cut_off": "TRAINING CUT OFF (Redis went away)",
    "abandoned": "TRAINING ABANDONED (its trainer stopped beating)",
}


@dataclass(slots=True)
class TrainingSession:
    """What a trainer did with its claimed cases, and how the model changed (held-out set)."""

    session_id: str
    trainer: str
    start_time_ms: int
    case_ids: list[str]
    base_version: int | None
    epochs_planned: int
    cases_trained: int = 0
    epochs_completed: int = 0
    stopped_early: bool = False
    # Percent lower held-out loss, and held-out accuracy points gained; None while there is
    # no held-out set yet (the case just trained is no evidence for the model).
    loss_improvement: float | None = None
    accuracy_improvement: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training_active: bool = True
    duration_s: float | None = None
    outcome: str | None = None
    published_version: int | None = None
    rejected_reason: str | None = None
    error: str | None = None
    rebases: int = 0

    def summary(self) -> str:
        """The line `negcase tail` shows for a finished session: how it ended first, then
        epochs, and the held-out improvements when a model was measured."""
        headline = _HEADLINES.get(self.outcome or "", "TRAINING ENDED")
        epochs = f"Epochs: {self.epochs_completed} of {self.epochs_planned}"
        if self.outcome not in ("published", "rejected"):
            return f"{headline}: {epochs}"
        return (
            f"{headline}: {epochs} | "
            f"Loss improvement: {_percent(self.loss_improvement)} | "
            f"Accuracy improvement: {_percent(self.accuracy_improvement)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for msgpack and JSON."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def to_msgpack(self) -> bytes:
        """The form stored at `<ns>:session:<id>`."""
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSession:
        """Build from stored data; fields a newer writer added are ignored."""
        return cls(**{name: data[name] for name in _FIELD_NAMES if name in data})

    @classmethod
    def from_msgpack(cls, blob: bytes) -> TrainingSession:
        """Decode a stored session."""
        return cls.from_dict(msgpack.unpackb(blob, raw=False))


def _percent(value: float | None) -> str:
    return "n/a (no held-out cases yet)" if value is None else f"{value:.1f}%"


_FIELD_NAMES = tuple(f.name for f in fields(TrainingSession))
