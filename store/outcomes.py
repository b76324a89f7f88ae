"""The outcomes learning draws on: the replay store `<ns>:outcomes` and the validation
window `<ns>:outcomes:validation`, capped streams of msgpack outcomes in arrival order that
the detector's batch script appends to (store/record_batch.lua), each trade once. With
partitions each partition has its own two streams (written in its batch script, so still
each trade once); they are read together, merged by entry id (arrival time)."""

from __future__ import annotations

from collections import deque

import redis

from negcase.schemas.outcome import Outcome
from negcase.store.keys import Keys
from negcase.store.streams import by_entry_id

FIELD = b"o"
READ_CHUNK = 1000


def outcome_fields(outcome: Outcome) -> bytes:
    """The stored form of one outcome (the stream entry's single field's value)."""
    return outcome.to_msgpack()


class OutcomeStore:
    """Reads the replay store incrementally (only what arrived since the last read) and the
    validation window whole, of every partition; both in time order, oldest first."""

    def __init__(
        self, client: redis.Redis, keys: Keys, replay_cap: int, partitions: int = 1
    ) -> None:
        self.client = client
        self.parts = keys.partitioned(partitions)
        self._replay: deque[Outcome] = deque(maxlen=replay_cap)
        self._last_ids = [b"-"] * len(self.parts)

    def seen(self) -> int:
        """How many outcomes the detectors have recorded in all (the stats counters)."""
        pipe = self.client.pipeline(transaction=False)
        for part in self.parts:
            pipe.hget(part.stats, "outcomes")
        return sum(int(count or 0) for count in pipe.execute())

    def replay(self) -> list[Outcome]:
        """The most recent outcomes of the replay store, at most the cap."""
        arrived: list[tuple[bytes, bytes]] = []
        for p, part in enumerate(self.parts):
            arrived += self._read_new(p, part)
        for _, packed in sorted(arrived, key=by_entry_id):
            self._replay.append(Outcome.from_msgpack(packed))
        return list(self._replay)

    def validation_window(self, size: int) -> list[Outcome]:
        """The `size` most recent held-out outcomes, oldest first: the gate's window."""
        if size <= 0:
            return []
        pipe = self.client.pipeline(transaction=False)
        for part in self.parts:
            pipe.xrevrange(part.validation, b"+", b"-", count=size)
        entries = [entry for reply in pipe.execute() for entry in reply]
        newest = sorted(entries, key=by_entry_id)[-size:]
        return [Outcome.from_msgpack(fields[FIELD]) for _, fields in newest]

    def _read_new(self, p: int, part: Keys) -> list[tuple[bytes, bytes]]:
        arrived = []
        while True:
            last = self._last_ids[p]
            start = last if last == b"-" else b"(" + last
            entries = self.client.xrange(part.outcomes, start, b"+", count=READ_CHUNK)
            for entry_id, fields in entries:
                arrived.append((entry_id, fields[FIELD]))
                self._last_ids[p] = entry_id
            if len(entries) < READ_CHUNK:
                return arrived
