"""What every consumer-group worker shares: reading entries out of a reply, its own pending
entries and abandoned ones, naming the consumer, its consumers and leaving the group, and
packing a dead letter for a Lua script; and the order that merges entries of several
streams."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping

import msgpack
import redis

from negcase.store.scripts import script

Entry = tuple[bytes, dict[bytes, bytes]]
FLAT_FIELDS_MAX = 256


def default_consumer_name() -> str:
    """host:pid, unique among live workers; pass --consumer for a name that survives restarts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def entries_of(reply: list | dict | None) -> list[Entry]:
    """The entries of an XREAD/XREADGROUP reply, for RESP2 and RESP3 alike."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    entries: list[Entry] = []
    for stream_entries in streams:
        # RESP3 wraps each stream's entries in one more list.
        if stream_entries and isinstance(stream_entries[0], list):
            stream_entries = stream_entries[0]
        entries.extend(stream_entries)
    return entries


def by_entry_id(entry: tuple[bytes, object]) -> tuple[int, int]:
    """Sort key of a stream entry (id first): its id as numbers, so that entries read from
    several streams merge in time order (as bytes, b"10-0" would sort before b"9-0")."""
    milliseconds, sequence = entry[0].split(b"-")
    return int(milliseconds), int(sequence)


def own_pending(
    client: redis.Redis, stream: str, group: str, consumer: str, count: int
) -> Iterator[list[Entry]]:
    """This consumer's pending entries, a page at a time: XREADGROUP from an id, not `>`,
    reads the pending list, and an entry whose data is gone comes as (id, {}). The caller
    must handle each page before asking for the next."""
    after: bytes | str = b"0"
    while entries := entries_of(client.xreadgroup(group, consumer, {stream: after}, count=count)):
        yield [(entry_id, fields or {}) for entry_id, fields in entries]
        after = entries[-1][0]


def claim_abandoned(
    client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
) -> Iterator[list[Entry]]:
    """Pages of up to `count` entries another consumer read but did not acknowledge for
    `min_idle_ms` (it died mid-batch), now this consumer's, following XAUTOCLAIM's cursor to
    the end. An entry deleted before it was handled comes as (entry_id, {}), for the caller
    to dead-letter and acknowledge. The caller must handle each page before the next."""
    cursor: bytes | str = b"0-0"
    while True:
        reply = client.xautoclaim(
            stream, group, consumer, min_idle_ms, start_id=cursor, count=count
        )
        cursor, claimed = reply[0], reply[1]
        entries = [(entry_id, fields) for entry_id, fields in claimed if entry_id is not None]
        if len(entries) < len(claimed):
            # Redis 6.2 answers nil, without the id, for a pending entry whose data is
            # gone, and moves it to this consumer's pending list anyway; only XACK
            # removes it (Redis 7 removes it itself and lists the ids in a third item).
            # Reading this consumer's own pending entries gives every id back.
            yield from own_pending(client, stream, group, consumer, count)
        elif entries:
            yield entries
        if len(reply) > 2 and reply[2]:
            yield [(entry_id, {}) for entry_id in reply[2]]
        if cursor in (b"0-0", "0-0"):
            return


def packed_dead_letter(
    fields: Mapping[bytes, bytes], field: str, reason: str, **about: bytes | str
) -> bytes:
    """A dead letter as a flat msgpack array for a Lua script to XADD: the original fields,
    then `dead:reason`, `dead:field` and one `dead:<name>` per keyword. An entry with more
    than FLAT_FIELDS_MAX fields keeps them packed in one `dead:original` field (a msgpack
    map): Lua's unpack() takes about 8,000 values, and XADD needs them all at once."""
    if len(fields) <= FLAT_FIELDS_MAX:
        items: list[bytes | str] = [part for pair in fields.items() for part in pair]
    else:
        items = ["dead:original", msgpack.packb(dict(fields), use_bin_type=False)]
    items += ["dead:reason", f"{field}: {reason}", "dead:field", field]
    for name, value in about.items():
        items += [f"dead:{name}", value]
    # Redis's cmsgpack predates msgpack's bin type: binary values travel as raw strings.
    return msgpack.packb(items, use_bin_type=False)


def group_consumers(client: redis.Redis, stream: str, group: str) -> list[dict[str, object]]:
    """The group's consumers (name, pending, idle_ms), most idle first; none when the stream
    or the group does not exist yet."""
    try:
        infos = client.xinfo_consumers(stream, group)
    except redis.ResponseError:
        return []
    rows = [
        {
            "name": _text(info["name"]),
            "pending": int(info["pending"]),
            "idle_ms": int(info["idle"]),
        }
        for info in infos
    ]
    return sorted(rows, key=lambda row: -row["idle_ms"])


def leave_group(
    client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int = 0
) -> tuple[str, int]:
    """Delete `consumer` from `group` unless it holds pending entries or was active within
    `min_idle_ms`: ('deleted', 0), ('pending', entries held), ('active', idle ms) or
    ('absent', 0). Without this every restart under a new name adds a consumer for good."""
    outcome, number = script(client, "leave_group")(
        keys=[stream], args=[group, consumer, min_idle_ms]
    )
    return _text(outcome), int(number)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
