"""`negcase tail`: one readable line per event on `<ns>:events` (the lines and the event types
are the catalogue's, schemas/event.py)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable

import orjson
import redis

from negcase.cli.options import connection_options, redis_client, settings_from
from negcase.schemas.event import EVENT_TYPES, Event, event_json, event_line
from negcase.store.keys import Keys
from negcase.store.streams import by_entry_id

# How often _follow_merged polls its streams while all are quiet (no XREAD spans slots).
POLL_S = 0.2


def format_event(event: Event) -> str:
    """One readable line per event, after its time of day."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at_ms / 1000))
    return f"{stamp} {event_line(event)}"


def follow_events(
    client: redis.Redis, keys: Keys, last: int, block_ms: int = 1000, partitions: int = 1
) -> Iterable[Event | None]:
    """Events from the `last` most recent on, then new ones as they come; None when a
    blocking read timed out (so callers can check for a stop). With partitions, the events
    of the namespace and of every partition (detectors and reapers write their partition's),
    merged by entry id."""
    if partitions > 1:
        streams = [part.events for part in keys.with_partitions(partitions)]
        yield from _follow_merged(client, streams, last, block_ms)
        return
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


def recent_events(client: redis.Redis, keys: Keys, count: int, partitions: int = 1) -> list[Event]:
    """The `count` newest events, newest first: with partitions, of the namespace and every
    partition merged by entry id (one pipeline; no XREAD spans Cluster slots)."""
    pipe = client.pipeline(transaction=False)
    for one in keys.with_partitions(partitions):
        pipe.xrevrange(one.events, count=count)
    entries = [entry for newest in pipe.execute() for entry in newest]
    entries.sort(key=by_entry_id, reverse=True)
    return [Event.from_fields(fields) for _, fields in entries[:count]]


def _follow_merged(
    client: redis.Redis, streams: list[str], last: int, block_ms: int
) -> Iterable[Event | None]:
    """follow_events over several streams, which may sit in different Cluster slots: each is
    read on its own (one XREAD may not span slots), polled every POLL_S when all are quiet."""
    recent, cursors = [], {}
    for stream in streams:
        newest = client.xrevrange(stream, count=max(1, last))
        cursors[stream] = newest[0][0] if newest else "0-0"
        recent += newest[: max(0, last)]
    shown = sorted(recent, key=by_entry_id)[-last:] if last > 0 else []
    for _, fields in shown:
        yield Event.from_fields(fields)
    while True:
        arrived = []
        for stream in streams:
            reply = client.xread({stream: cursors[stream]}, count=500)
            for entry_id, fields in reply[0][1] if reply else []:
                cursors[stream] = entry_id
                arrived.append((entry_id, fields))
        if not arrived:
            time.sleep(min(POLL_S, block_ms / 1000))
            yield None
            continue
        for _, fields in sorted(arrived, key=by_entry_id):
            yield Event.from_fields(fields)


def _wanted(event: Event, types: set[str], symbols: set[str]) -> bool:
    if types and event.type not in types:
        return False
    return not symbols or event.details.get("symbol") in symbols


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase tail`."""
    tail = sub.add_parser(
        "tail",
        parents=[connection_options()],
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
        for event in follow_events(
            client, settings.keys, args.last, partitions=settings.partitions
        ):
            if event is None or not _wanted(event, types, symbols):
                continue
            if args.json:
                print(orjson.dumps(event_json(event)).decode(), flush=True)
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
