"""The case store: case blobs, the idempotency set, and the detector's batch write."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain

import msgpack
import redis

from negcase.schemas import event as events
from negcase.schemas.case import NegativeCase
from negcase.schemas.event import Event
from negcase.store.keys import DETECTOR_GROUP, Keys
from negcase.store.live import LiveOutcome
from negcase.store.queue import queue_score
from negcase.store.replication import NO_ACKS, ReplicaAcks
from negcase.store.scripts import script
from negcase.store.streams import packed_dead_letter

RATE_BUCKET_S = 10
# Rates are shown over the last minute of complete buckets.
RATE_WINDOW_S = 60
RATE_TTL_S = 600


@dataclass(slots=True)
class DeadLetter:
    """A trade entry that failed validation: its original fields and why."""

    entry_id: bytes
    fields: Mapping[bytes, bytes]
    field: str
    reason: str
    trade_id: str | None = None


@dataclass(slots=True)
class Batch:
    """What one detector batch produced, written by `CaseStore.record_batch` in one call."""

    cases: list[NegativeCase] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    handled_ids: list[bytes] = field(default_factory=list)
    # (msgpack outcome, held out) for every trade with features: what learning replays.
    outcomes: list[tuple[bytes, bool]] = field(default_factory=list)
    # Decisions that named a model version, for the live windows (store/live.py, written
    # before record_batch: each trade is scored once however often it is delivered).
    live: list[LiveOutcome] = field(default_factory=list)

    def add_case(self, case: NegativeCase) -> None:
        """Add a case; it is encoded here, once, for both Redis and the archive."""
        self.cases.append(case)
        self.blobs.append(case.to_msgpack())

    def count(self, name: str, by: int = 1) -> None:
        """Add to a stats counter."""
        self.counters[name] = self.counters.get(name, 0) + by


def version_label(model_version: int | None) -> str:
    """How a model version appears in stats field names (`model:<label>:trades`)."""
    return "none" if model_version is None else str(model_version)


def rate_bucket_s(now_s: float) -> int:
    """The start of the rate window (10 s) that `now_s` falls in."""
    return int(now_s) // RATE_BUCKET_S * RATE_BUCKET_S


class CaseStore:
    """Negative cases in Redis: `<ns>:case:<id>` blobs, `<ns>:cases`, and the queue."""

    def __init__(self, client: redis.Redis, keys: Keys, acks: ReplicaAcks = NO_ACKS) -> None:
        self.client = client
        self.keys = keys
        self.acks = acks
        self._record_batch = script(client, "record_batch")

    def record_batch(
        self,
        batch: Batch,
        consumer: str,
        events_maxlen: int,
        dead_maxlen: int,
        trades_maxlen: int = 0,
        outcomes_maxlen: int = 5000,
        validation_maxlen: int = 500,
    ) -> tuple[int, int]:
        """Store a batch's cases, dead letters, counters and events, and acknowledge its
        entries, atomically. Returns (new cases, duplicates)."""
        keys = self.keys
        now_ms = int(time.time() * 1000)
        case_keys = [keys.case(case.case_id) for case in batch.cases]
        args: list[bytes | str | int | float] = [
            DETECTOR_GROUP,
            events_maxlen,
            dead_maxlen,
            RATE_TTL_S,
            trades_maxlen,
            len(batch.cases),
            len(batch.dead_letters),
            len(batch.counters),
            len(batch.handled_ids),
            len(batch.outcomes),
            outcomes_maxlen,
            validation_maxlen,
        ]
        for case, blob in zip(batch.cases, batch.blobs, strict=True):
            args += [
                case.case_id,
                blob,
                _score_arg(case),
                version_label(case.model_version),
                case.loss_percentage,
                _packed_event(events.case_added(case, consumer, now_ms)),
                "opportunity" if case.side == "HOLD" else "loss",
            ]
        for dead in batch.dead_letters:
            args += _dead_letter_args(dead, consumer, now_ms)
        for name, by in batch.counters.items():
            args += [name, by]
        for blob, held_out in batch.outcomes:
            args += [blob, int(held_out)]
        args += batch.handled_ids
        added, duplicates = self.acks.run_script(
            self.client,
            self._record_batch,
            keys=[
                keys.trades,
                keys.cases,
                keys.featureless,
                keys.queue,
                keys.events,
                keys.stats,
                keys.trades_dead,
                keys.rate_bucket(rate_bucket_s(now_ms / 1000)),
                keys.outcomes,
                keys.validation,
                *case_keys,
            ],
            args=args,
        )
        return int(added), int(duplicates)

    def add(self, cases: Iterable[NegativeCase], worker: str, events_maxlen: int = 10_000) -> int:
        """Store and queue cases made without a trade (tools, tests, benchmarks) through the
        detector's batch write. Returns how many were new."""
        batch = Batch()
        for case in cases:
            batch.add_case(case)
        added, _ = self.record_batch(batch, worker, events_maxlen, events_maxlen)
        return added

    def get(self, case_id: str) -> NegativeCase | None:
        """One case from Redis, or None."""
        blob = self.client.get(self.keys.case(case_id))
        return None if blob is None else NegativeCase.from_msgpack(blob)

    def get_many(self, case_ids: Iterable[str]) -> list[NegativeCase]:
        """Cases by id in one round trip; ids with no stored case are skipped."""
        ids = list(case_ids)
        if not ids:
            return []
        blobs = self.client.mget([self.keys.case(case_id) for case_id in ids])
        return [NegativeCase.from_msgpack(blob) for blob in blobs if blob is not None]


def _score_arg(case: NegativeCase) -> str:
    if not case.trainable:
        return ""
    score = queue_score(case.training_priority, case.loss_percentage, case.created_at_ms)
    return repr(score)


def _dead_letter_args(dead: DeadLetter, consumer: str, now_ms: int) -> list[bytes]:
    """record_batch.lua's two arguments for a dead letter: its copy and its event."""
    copy = packed_dead_letter(
        dead.fields,
        dead.field,
        dead.reason,
        entry_id=dead.entry_id,
        consumer=consumer,
        at_ms=str(now_ms),
    )
    event = events.dead_lettered(
        dead.entry_id.decode(), dead.trade_id, dead.field, dead.reason, consumer, now_ms
    )
    return [copy, _packed_event(event)]


def _packed_event(event: Event) -> bytes:
    return msgpack.packb(list(chain.from_iterable(event.to_fields().items())))
