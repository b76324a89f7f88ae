"""`negcase tail`: one readable line per event on `<ns>:events`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable

import orjson
import redis

from negcase.cli.options import common_options, redis_client, settings_from
from negcase.schemas.event import EVENT_TYPES, Event
from negcase.store.keys import Keys


def _case_added(d: dict[str, str]) -> str:
    line = (
        f"NEGATIVE CASE ADDED: {d.get('case_id')} | {d.get('symbol')} {d.get('side')} | "
        f"Loss: ${float(d.get('loss_amount', 0)):.2f} ({float(d.get('loss_pct', 0)):.1f}%) | "
        f"Priority: {d.get('priority')} | Should have: {d.get('should_have')}"
    )
    if d.get("trainable") == "0":
        return f"{line} | no features: archived, not queued"
    return f"{line} | Epochs: {d.get('epochs')}"


def _dead_lettered(d: dict[str, str]) -> str:
    return (
        f"DEAD LETTER: entry {d.get('entry_id')} | trade {d.get('trade_id', '?')} | "
        f"{d.get('field')}: {d.get('reason')}"
    )


def _training_started(d: dict[str, str]) -> str:
    return (
        f"INTENSIVE TRAINING STARTED: {d.get('trainer')} | Cases: {d.get('cases')} | "
        f"Epochs: {d.get('epochs')} | Base: {_version(d.get('base_version'))} | "
        f"Session: {d.get('session_id')}"
    )


def _training_completed(d: dict[str, str]) -> str:
    # `summary` is TrainingSession.summary(): epochs and the held-out improvements.
    summary = d.get("summary") or f"INTENSIVE TRAINING COMPLETED: Epochs: {d.get('epochs')}"
    outcome = d.get("outcome")
    if outcome == "published":
        result = f"Published: {_version(d.get('version'))}"
    elif outcome == "rejected":
        result = f"Rejected by gate: {d.get('rejected_reason')}"
    else:
        result = f"{str(outcome).capitalize()}: {d.get('error', '-')}"
    return f"{summary} | {result} | {d.get('trainer')} in {float(d.get('duration_s', 0)):.2f}s"


def _checkpoint_published(d: dict[str, str]) -> str:
    return (
        f"CHECKPOINT PUBLISHED: {_version(d.get('version'))} "
        f"(parent {_version(d.get('parent_version'))}) | by {d.get('trainer') or '?'} | "
        f"sha256 {d.get('sha256', '')[:12]}"
    )


def _rollback(d: dict[str, str]) -> str:
    return (
        f"ROLLBACK: latest is {_version(d.get('version'))} again "
        f"(was {_version(d.get('previous_version'))}) | sha256 {d.get('sha256', '')[:12]}"
    )


def _checkpoint_loaded(d: dict[str, str]) -> str:
    return (
        f"CHECKPOINT LOADED: {_version(d.get('version'))} on {d.get('worker')} "
        f"(was serving {_version(d.get('serving_version'))}) | "
        f"Reload: {float(d.get('reload_ms', 0)):.1f} ms"
    )


def _checkpoint_rejected(d: dict[str, str]) -> str:
    return (
        f"CHECKPOINT REJECTED: {_version(d.get('version'))} on {d.get('worker')} | "
        f"{d.get('reason')} | still serving {_version(d.get('serving_version'))}"
    )


def _lease_expired(d: dict[str, str]) -> str:
    return (
        f"LEASE EXPIRED: {d.get('case_id')} | held by {d.get('worker')} | "
        f"Attempts: {d.get('attempts')}"
    )


def _case_dead(d: dict[str, str]) -> str:
    # A case the reaper kills names no worker: its holder is in the error.
    by = f" | by {d['worker']}" if "worker" in d else ""
    return (
        f"CASE DEAD: {d.get('case_id')} | Attempts: {d.get('attempts')}{by} | "
        f"Last error: {d.get('error')}"
    )


def _version(raw: str | None) -> str:
    """`v3`, or `none` for a field that is absent or empty (no model yet)."""
    return f"v{raw}" if raw else "none"


FORMATTERS: dict[str, Callable[[dict[str, str]], str]] = {
    "case_added": _case_added,
    "dead_lettered": _dead_lettered,
    "training_started": _training_started,
    "training_completed": _training_completed,
    "checkpoint_published": _checkpoint_published,
    "rollback": _rollback,
    "checkpoint_loaded": _checkpoint_loaded,
    "checkpoint_rejected": _checkpoint_rejected,
    "lease_expired": _lease_expired,
    "case_dead": _case_dead,
}


def format_event(event: Event) -> str:
    """One readable line per event."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at_ms / 1000))
    formatter = FORMATTERS.get(event.type)
    if formatter is not None:
        return f"{stamp} {formatter(event.details)}"
    details = " | ".join(f"{k}: {v}" for k, v in event.details.items())
    return f"{stamp} {event.type.upper().replace('_', ' ')}: {details}"


def follow_events(
    client: redis.Redis, keys: Keys, last: int, block_ms: int = 1000
) -> Iterable[Event | None]:
    """Events from the `last` most recent on, then new ones as they come; None when a
    blocking read timed out (so callers can check for a stop)."""
    cursor = "$"
    if last > 0:
        recent = client.xrevrange(keys.events, count=last)
        for entry_id, fields in reversed(recent):
            yield Event.from_fields(fields)
            cursor = entry_id
        if not recent:
            cursor = "0-0"
    while True:
        reply = client.xread({keys.events: cursor}, block=block_ms, count=500)
        if not reply:
            yield None
            continue
        for entry_id, fields in reply[0][1]:
            cursor = entry_id
            yield Event.from_fields(fields)


def _wanted(event: Event, types: set[str], symbols: set[str]) -> bool:
    if types and event.type not in types:
        return False
    return not symbols or event.details.get("symbol") in symbols


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase tail`."""
    tail = sub.add_parser(
        "tail",
        parents=[common_options()],
        help="follow <ns>:events, one readable line per event",
        description="Follow the events stream: cases added, training, checkpoints, dead letters.",
    )
    tail.add_argument("--last", type=int, default=10, help="show the N most recent first (10)")
    tail.add_argument(
        "--type",
        action="append",
        default=[],
        choices=EVENT_TYPES,
        help="only this event type (repeatable)",
    )
    tail.add_argument("--symbol", action="append", default=[], help="only this symbol (repeatable)")
    tail.add_argument("--count", type=int, help="exit after printing this many events")
    tail.add_argument("--json", action="store_true", help="print each event as a JSON line")
    tail.set_defaults(run=run_tail)


def run_tail(args: argparse.Namespace) -> int:
    """Follow events until Ctrl-C or --count."""
    settings = settings_from(args)
    client = redis_client(settings)
    types, symbols = set(args.type), set(args.symbol)
    shown = 0
    try:
        for event in follow_events(client, settings.keys, args.last):
            if event is None or not _wanted(event, types, symbols):
                continue
            if args.json:
                line = orjson.dumps({"type": event.type, "at_ms": event.at_ms, **event.details})
                print(line.decode(), flush=True)
            else:
                print(format_event(event), flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        sys.stderr.close()
    return 0
