"""The event catalogue: every entry on `<ns>:events`, with its fields, who emits it, a builder
for the events Python writes, and the line `negcase tail` shows for it.

An event is flat text fields (`type`, `at_ms`, then its details) so plain redis-cli reads it.
Seven types are written by Lua scripts, which cannot import Python: their entries here are
the documentation those scripts follow, and tests/test_events.py checks the scripts keep to
it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from negcase.schemas.case import NegativeCase
from negcase.schemas.session import TrainingSession


@dataclass(slots=True)
class Event:
    """Something that happened: a type, when (ms, Redis time for scripts), and details."""

    type: str
    at_ms: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        """Stream fields: `type`, `at_ms`, then each detail as text (None is left out)."""
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


@dataclass(frozen=True, slots=True)
class EventType:
    """One kind of event: who emits it, its detail fields (name -> meaning; a field whose
    value is None is left out of the entry), and its one-line form for people."""

    name: str
    emitted_by: str
    fields: Mapping[str, str]
    line: Callable[[dict[str, str]], str]


# builders, for the events Python writes


def case_added(case: NegativeCase, worker: str, now_ms: int) -> Event:
    """A loss became a new negative case (store/cases.py, via record_batch.lua)."""
    return Event(
        "case_added",
        now_ms,
        {
            "case_id": case.case_id,
            "trade_id": case.trade_id,
            "symbol": case.symbol,
            "side": case.side,
            "priority": case.training_priority,
            "loss_pct": round(case.loss_percentage, 4),
            "loss_amount": round(case.loss_amount, 4),
            "epochs": case.training_epochs,
            "should_have": case.what_should_have_been_done,
            "trainable": int(case.trainable),
            "model_version": case.model_version,
            "worker": worker,
            "lesson": case.lesson_learned,
        },
    )


def dead_lettered(
    entry_id: str, trade_id: str | None, field_name: str, reason: str, worker: str, now_ms: int
) -> Event:
    """A trade entry failed validation and was copied to `<ns>:trades:dead`."""
    details = {
        "entry_id": entry_id,
        "trade_id": trade_id,
        "field": field_name,
        "reason": reason,
        "worker": worker,
    }
    return Event("dead_lettered", now_ms, details)


def training_started(session: TrainingSession, now_ms: int) -> Event:
    """A trainer began an intensive session on the cases it claimed."""
    details = {
        "session_id": session.session_id,
        "trainer": session.trainer,
        "cases": ",".join(session.case_ids),
        "base_version": session.base_version,
        "epochs": session.epochs_planned,
    }
    return Event("training_started", now_ms, details)


def training_completed(session: TrainingSession, now_ms: int) -> Event:
    """A session ended, whatever its outcome."""
    details = {
        "session_id": session.session_id,
        "trainer": session.trainer,
        "cases": ",".join(session.case_ids),
        "outcome": session.outcome,
        "epochs": session.epochs_completed,
        "loss_improvement": session.loss_improvement,
        "accuracy_improvement": session.accuracy_improvement,
        "version": session.published_version,
        "rejected_reason": session.rejected_reason,
        "error": session.error,
        "duration_s": session.duration_s,
        "summary": session.summary(),
    }
    return Event("training_completed", now_ms, details)


def checkpoint_loaded(
    worker: str,
    version: int,
    serving_version: int | None,
    reload_ms: float,
    now_ms: int,
    role: str = "service",
) -> Event:
    """A worker verified a checkpoint and serves it now, in service or as the canary."""
    details = {
        "worker": worker,
        "version": version,
        "role": role,
        "serving_version": serving_version,
        "reload_ms": round(reload_ms, 3),
    }
    return Event("checkpoint_loaded", now_ms, details)


def checkpoint_rejected(
    worker: str,
    version: int,
    serving_version: int | None,
    reason: str,
    now_ms: int,
    role: str = "service",
) -> Event:
    """A worker refused a checkpoint and keeps serving the one it had."""
    details = {
        "worker": worker,
        "version": version,
        "role": role,
        "serving_version": serving_version,
        "reason": reason,
    }
    return Event("checkpoint_rejected", now_ms, details)


# one line per event for people (`negcase tail`)


def _version(raw: str | None) -> str:
    """`v3`, or `none` for a field that is absent or empty (no model yet)."""
    return f"v{raw}" if raw else "none"


def _case_added_line(d: dict[str, str]) -> str:
    line = (
        f"NEGATIVE CASE ADDED: {d.get('case_id')} | {d.get('symbol')} {d.get('side')} | "
        f"Loss: ${float(d.get('loss_amount', 0)):.2f} ({float(d.get('loss_pct', 0)):.1f}%) | "
        f"Priority: {d.get('priority')} | Should have: {d.get('should_have')}"
    )
    if d.get("trainable") == "0":
        return f"{line} | no features: archived, not queued"
    return f"{line} | Epochs: {d.get('epochs')}"


def _dead_lettered_line(d: dict[str, str]) -> str:
    return (
        f"DEAD LETTER: entry {d.get('entry_id')} | trade {d.get('trade_id', '?')} | "
        f"{d.get('field')}: {d.get('reason')}"
    )


def _training_started_line(d: dict[str, str]) -> str:
    return (
        f"INTENSIVE TRAINING STARTED: {d.get('trainer')} | Cases: {d.get('cases')} | "
        f"Epochs: {d.get('epochs')} | Base: {_version(d.get('base_version'))} | "
        f"Session: {d.get('session_id')}"
    )


def _training_completed_line(d: dict[str, str]) -> str:
    # `summary` is TrainingSession.summary(): how the session ended, epochs, improvements.
    outcome = d.get("outcome")
    summary = d.get("summary") or f"TRAINING {str(outcome).upper()}: Epochs: {d.get('epochs')}"
    if outcome == "published":
        result = f"Published: {_version(d.get('version'))}"
    elif outcome == "rejected":
        result = f"Reason: {d.get('rejected_reason')}"
    elif outcome == "interrupted":
        result = "Cases handed back to the queue"
    else:
        result = f"{str(outcome).capitalize()}: {d.get('error', '-')}"
    return f"{summary} | {result} | {d.get('trainer')} in {float(d.get('duration_s', 0)):.2f}s"


def _checkpoint_published_line(d: dict[str, str]) -> str:
    return (
        f"CHECKPOINT PUBLISHED: {_version(d.get('version'))} "
        f"(parent {_version(d.get('parent_version'))}) | by {d.get('trainer') or '?'} | "
        f"sha256 {d.get('sha256', '')[:12]}"
    )


def _rollback_line(d: dict[str, str]) -> str:
    return (
        f"ROLLBACK: {_version(d.get('version'))} in service again "
        f"(was {_version(d.get('previous_version'))}) | {d.get('reason', 'operator')}"
        f"{_figures(d)} | sha256 {d.get('sha256', '')[:12]}"
    )


def _canary_started_line(d: dict[str, str]) -> str:
    return (
        f"CANARY STARTED: {_version(d.get('version'))} answers "
        f"{float(d.get('share', 0)):.0%} of signal requests | in service: "
        f"{_version(d.get('service_version'))} | judged after {d.get('min_outcomes')} outcomes"
    )


def _promoted_line(d: dict[str, str]) -> str:
    return (
        f"PROMOTED: {_version(d.get('version'))} in service "
        f"(was {_version(d.get('previous_version'))}) | {d.get('reason')}{_figures(d)}"
    )


def _retired_line(d: dict[str, str]) -> str:
    return (
        f"RETIRED: canary {_version(d.get('version'))} | {d.get('reason')}{_figures(d)} | "
        f"{_version(d.get('service_version'))} stays in service"
    )


def _deferred_line(d: dict[str, str]) -> str:
    return (
        f"DEFERRED: {_version(d.get('version'))} in service answers with no opinion, the "
        f"engine keeps its own rule | {d.get('reason')} | mean P&L "
        f"{float(d.get('mean_pnl_pct', 0)):+.3f}% per decision against the rule's "
        f"{float(d.get('rule_mean_pnl_pct', 0)):+.3f}% over the same {d.get('n')} | "
        f"z {float(d.get('z', 0)):+.2f}, threshold {float(d.get('z_threshold', 0)):+.2f}"
    )


def _figures(d: dict[str, str]) -> str:
    """The live comparison a serving decision rests on, when it rests on one."""
    if "z" not in d:
        return ""
    return (
        f" | mean P&L {float(d['mean_pnl_pct']):+.3f}% per decision over {d.get('n')} "
        f"(loss rate {float(d.get('loss_rate', 0)):.1%}) against "
        f"{_version(d.get('baseline_version'))}'s {float(d['baseline_mean_pnl_pct']):+.3f}% "
        f"over {d.get('baseline_n')} ({float(d.get('baseline_loss_rate', 0)):.1%}) | "
        f"z {float(d['z']):+.2f}, threshold {float(d.get('z_threshold', 0)):+.2f}"
    )


def _checkpoint_loaded_line(d: dict[str, str]) -> str:
    role = " as canary" if d.get("role") == "canary" else ""
    return (
        f"CHECKPOINT LOADED: {_version(d.get('version'))}{role} on {d.get('worker')} "
        f"(was serving {_version(d.get('serving_version'))}) | "
        f"Reload: {float(d.get('reload_ms', 0)):.1f} ms"
    )


def _checkpoint_rejected_line(d: dict[str, str]) -> str:
    role = " (canary)" if d.get("role") == "canary" else ""
    return (
        f"CHECKPOINT REJECTED: {_version(d.get('version'))}{role} on {d.get('worker')} | "
        f"{d.get('reason')} | still serving {_version(d.get('serving_version'))}"
    )


def _lease_expired_line(d: dict[str, str]) -> str:
    return (
        f"LEASE EXPIRED: {d.get('case_id')} | held by {d.get('worker')} | "
        f"Attempts: {d.get('attempts')}"
    )


def _case_dead_line(d: dict[str, str]) -> str:
    # A case the reaper kills names no worker: its holder is in the error.
    by = f" | by {d['worker']}" if "worker" in d else ""
    return (
        f"CASE DEAD: {d.get('case_id')} | Attempts: {d.get('attempts')}{by} | "
        f"Last error: {d.get('error')}"
    )


# The live comparison behind a promotion, retirement or rollback (absent when none was made:
# the first version, a share of 0, a refusal, an operator).
_FIGURES = {
    "n": "outcomes in the judged version's live window",
    "mean_pnl_pct": "its mean P&L per decision, percent of margin (a skip counts as 0)",
    "loss_rate": "its losses per trade",
    "baseline_version": "the version it was compared with",
    "baseline_n": "outcomes in that version's window",
    "baseline_mean_pnl_pct": "that version's mean P&L per decision",
    "baseline_loss_rate": "that version's losses per trade",
    "z": "(mean - baseline mean) / standard error (Welch)",
    "z_threshold": "below this z the judged version is retired or rolled back",
}

_SESSION_FIELDS = {
    "session_id": "the session (`<ns>:session:<id>`)",
    "trainer": "the trainer's name",
    "cases": "the case ids trained, comma-separated",
}

CATALOGUE: dict[str, EventType] = {
    t.name: t
    for t in (
        EventType(
            "case_added",
            "detector (store/cases.py case_added, written by record_batch.lua)",
            {
                "case_id": "the new case",
                "trade_id": "the losing trade, or the skipped decision that missed a move",
                "symbol": "the instrument",
                "side": "BUY or SELL; HOLD for a missed opportunity",
                "priority": "training priority, 1-5",
                "loss_pct": "loss (or missed gain) in percent of the margin",
                "loss_amount": "loss in quote currency",
                "epochs": "planned training epochs",
                "should_have": "what should have been done: BUY, SELL or HOLD",
                "trainable": "1 when queued for training, 0 when it has no features",
                "model_version": "the version that made the trade, if the engine said",
                "worker": "the detector",
                "lesson": "the lesson learned, in words",
            },
            _case_added_line,
        ),
        EventType(
            "dead_lettered",
            "detector (store/cases.py, written by record_batch.lua)",
            {
                "entry_id": "the entry on `<ns>:trades`",
                "trade_id": "its trade_id, when it had one",
                "field": "the field at fault",
                "reason": "why it was refused",
                "worker": "the detector",
            },
            _dead_lettered_line,
        ),
        EventType(
            "training_started",
            "trainer (store/sessions.py)",
            {
                **_SESSION_FIELDS,
                "base_version": "the checkpoint it starts from (absent before the first)",
                "epochs": "planned epochs",
            },
            _training_started_line,
        ),
        EventType(
            "training_completed",
            "trainer, or any trainer's reaper for a session whose trainer stopped beating "
            "(store/sessions.py, complete_session.lua: once per session)",
            {
                **_SESSION_FIELDS,
                "outcome": "published, rejected, lease_lost, interrupted, failed, cut_off "
                "(Redis went away mid-session) or abandoned (its trainer stopped beating)",
                "epochs": "epochs completed",
                "loss_improvement": "held-out loss improvement, percent",
                "accuracy_improvement": "held-out accuracy gained, points",
                "version": "the version published",
                "rejected_reason": "why the validation gate refused the update",
                "error": "what went wrong (failed, lease_lost)",
                "duration_s": "wall time of the session",
                "summary": "the session's summary line",
            },
            _training_completed_line,
        ),
        EventType(
            "checkpoint_published",
            "trainer (store/publish_checkpoint.lua)",
            {
                "version": "the new version, now latest",
                "parent_version": "the version it was built on ('' for the first)",
                "sha256": "of the safetensors bytes",
                "trainer": "who published it",
            },
            _checkpoint_published_line,
        ),
        EventType(
            "checkpoint_loaded",
            "inference worker or Predictor (processes/reloader.py)",
            {
                "worker": "who loaded it",
                "version": "the version now served",
                "role": "service (answers requests) or canary (answers a share on trial)",
                "serving_version": "the version in service before, if any",
                "reload_ms": "fetch, verify and load time",
            },
            _checkpoint_loaded_line,
        ),
        EventType(
            "checkpoint_rejected",
            "inference worker or Predictor (processes/reloader.py)",
            {
                "worker": "who refused it",
                "version": "the version refused",
                "role": "what it was to be: service or canary",
                "serving_version": "the version still in service, if any",
                "reason": "why it was refused",
            },
            _checkpoint_rejected_line,
        ),
        EventType(
            "lease_expired",
            "any trainer's reaper (store/reap.lua)",
            {
                "case_id": "the case whose lease lapsed",
                "attempts": "attempts counted so far",
                "worker": "who held the lease",
            },
            _lease_expired_line,
        ),
        EventType(
            "case_dead",
            "store/reap.lua, store/give_back.lua",
            {
                "case_id": "the case given up on",
                "attempts": "attempts counted",
                "error": "the last error",
                "worker": "the trainer that failed it (absent when the reaper killed it)",
            },
            _case_dead_line,
        ),
        EventType(
            "canary_started",
            "the serving step (store/serving_step.lua)",
            {
                "version": "the new version, now answering a share of signal requests",
                "service_version": "the version in service, answering the rest",
                "share": "the canary's share of requests (NEGCASE_CANARY_SHARE)",
                "min_outcomes": "live outcomes it needs before it is judged",
            },
            _canary_started_line,
        ),
        EventType(
            "promoted",
            "the serving step (store/serving_step.lua)",
            {
                "version": "the version now in service, answering every request",
                "previous_version": "the version in service before ('' for none)",
                "reason": "why, in words",
                **_FIGURES,
            },
            _promoted_line,
        ),
        EventType(
            "retired",
            "the serving step (store/serving_step.lua)",
            {
                "version": "the canary taken off trial; latest points at the version in service",
                "service_version": "the version that stays in service",
                "reason": "why, in words",
                **_FIGURES,
            },
            _retired_line,
        ),
        EventType(
            "rollback",
            "the serving step, or an operator (store/serving_step.lua, rollback_checkpoint.lua)",
            {
                "version": "the version in service again; latest points at it",
                "previous_version": "the version in service before",
                "sha256": "of the version's safetensors bytes",
                "reason": "why: `operator`, or the live comparison or refusal in words",
                **_FIGURES,
            },
            _rollback_line,
        ),
        EventType(
            "deferred",
            "the serving step (store/serving_step.lua)",
            {
                "version": "the version in service, now answering every request with no opinion",
                "reason": "why, in words",
                "n": "its decisions whose engine said what its own rule would have done",
                "mean_pnl_pct": "its mean P&L per decision on them (a skip counts as 0)",
                "rule_mean_pnl_pct": "the rule's mean P&L per decision on the same decisions",
                "z": "(mean - rule's mean) / standard error of the paired differences",
                "z_threshold": "below this z the version defers (-NEGCASE_CANARY_Z)",
            },
            _deferred_line,
        ),
    )
}
# In the order `negcase tail --help` lists them.
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
    "canary_started",
    "promoted",
    "retired",
    "rollback",
    "deferred",
)


def event_line(event: Event) -> str:
    """What the event says, in one line, without its time."""
    kind = CATALOGUE.get(event.type)
    if kind is not None:
        return kind.line(event.details)
    details = " | ".join(f"{k}: {v}" for k, v in event.details.items())
    return f"{event.type.upper().replace('_', ' ')}: {details}"


# Detail fields that hold numbers: a stream keeps every field as text, so `tail --json` reads
# their type here to print them as JSON numbers.
NUMBER_FIELDS = frozenset(
    {
        "accuracy_improvement",
        "attempts",
        "base_version",
        "baseline_loss_rate",
        "baseline_mean_pnl_pct",
        "baseline_n",
        "baseline_version",
        "duration_s",
        "epochs",
        "loss_amount",
        "loss_improvement",
        "loss_pct",
        "loss_rate",
        "mean_pnl_pct",
        "min_outcomes",
        "model_version",
        "n",
        "parent_version",
        "previous_version",
        "priority",
        "reload_ms",
        "rule_mean_pnl_pct",
        "service_version",
        "serving_version",
        "share",
        "trainable",
        "version",
        "z",
        "z_threshold",
    }
)


def event_json(event: Event) -> dict[str, Any]:
    """An event as JSON data: type, at_ms and its details, numbers as numbers."""
    details = {name: _typed(name, value) for name, value in event.details.items()}
    return {"type": event.type, "at_ms": event.at_ms, **details}


def _typed(name: str, value: str) -> Any:
    if name not in NUMBER_FIELDS:
        return value
    try:
        number = float(value)
    except ValueError:  # an older or newer writer's text: shown as it is
        return value
    return int(number) if number.is_integer() and "." not in value else number


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
