"""The outcomes learning draws on: the replay store `<ns>:outcomes` and the validation
window `<ns>:outcomes:validation`, capped streams of msgpack outcomes in arrival order that
the detector's batch script appends to (store/record_batch.lua), each trade once."""

from __future__ import annotations

from collections import deque

import redis

from negcase.schemas.outcome import Outcome
from negcase.store.keys import Keys

FIELD = b"o"
READ_CHUNK = 1000


def outcome_fields(outcome: Outcome) -> bytes:
    """The stored form of one outcome (the stream entry's single field's value)."""
    return outcome.to_msgpack()


class OutcomeStore:
    """Reads the replay store incrementally (only what arrived since the last read) and the
    validation window whole; both in time order, oldest first."""

    def __init__(self, client: redis.Redis, keys: Keys, replay_cap: int) -> None:
        self.client = client
        self.keys = keys
        self._replay: deque[Outcome] = deque(maxlen=replay_cap)
        self._last_id = b"-"

    def seen(self) -> int:
        """How many outcomes the detectors have recorded in all (the stats counter)."""
        return int(self.client.hget(self.keys.stats, "outcomes") or 0)

    def replay(self) -> list[Outcome]:
        """The most recent outcomes of the replay store, at most the cap."""
        while True:
            start = self._last_id if self._last_id == b"-" else b"(" + self._last_id
            entries = self.client.xrange(self.keys.outcomes, start, b"+", count=READ_CHUNK)
            for entry_id, fields in entries:
                self._replay.append(Outcome.from_msgpack(fields[FIELD]))
                self._last_id = entry_id
            if len(entries) < READ_CHUNK:
                return list(self._replay)

    def validation_window(self, size: int) -> list[Outcome]:
        """The `size` most recent held-out outcomes, oldest first: the gate's window."""
        if size <= 0:
            return []
        entries = self.client.xrevrange(self.keys.validation, b"+", b"-", count=size)
        return [Outcome.from_msgpack(fields[FIELD]) for _, fields in reversed(entries)]
