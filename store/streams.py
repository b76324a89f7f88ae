"""What every consumer-group worker shares: reading entries out of a reply, naming the
consumer, and packing a dead letter for a Lua script."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import msgpack

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
