"""The case store: case blobs, the idempotency record, and the detector's batch write."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, field
from itertools import chain

import msgpack
import redis

from negcase.schemas import event as events
from negcase.schemas.case import NegativeCase, trade_key
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
class Effect:
    """What one entry becomes, packed for record_batch.lua: its kind (loss, opportunity: a
    skip that missed a move, win, skip, or dead), its case, its outcome for learning. All
    that can fail on odd input (msgpack refusing a value, say) happens when it is built,
    inside the detector's per-entry handling."""

    entry_id: bytes
    kind: str
    key: str = ""
    case: NegativeCase | None = None
    blob: bytes = b""
    version: str = ""
    score: str = ""
    loss_pct: str = ""
    payload: bytes = b""
    event: bytes = b""
    # The outcome learning replays (msgpack, b"" for none) and whether its trade is held out.
    outcome: bytes = b""
    held_out: bool = False
    # The entry as read, and its trade id: kept (not copied) to dead-letter it if Redis
    # refuses to store what it became.
    fields: Mapping[bytes, bytes] | None = None
    trade_id: str | None = None

    def args(self) -> list[bytes | str]:
        """The entry's eleven arguments of record_batch.lua."""
        return [
            self.entry_id,
            self.kind,
            self.key,
            self.case.case_id if self.case else "",
            self.version,
            self.score,
            self.loss_pct,
            self.payload,
            self.event,
            self.outcome,
            "1" if self.held_out else "0",
        ]


@dataclass(slots=True)
class Batch:
    """What one detector batch produced, written by `CaseStore.record_batch` in one call."""

    effects: list[Effect] = field(default_factory=list)
    # Decisions that named a model version, for the live windows (store/live.py, written
    # before record_batch: each trade is scored once however often it is delivered).
    live: list[LiveOutcome] = field(default_factory=list)

    def add_case(
        self,
        case: NegativeCase,
        worker: str = "",
        now_ms: int | None = None,
        entry_id: bytes = b"",
        fields: Mapping[bytes, bytes] | None = None,
        outcome: tuple[bytes, bool] = (b"", False),
    ) -> None:
        """Add a loss, or a skip that missed a move (a case whose side is HOLD); its blob
        and event are encoded here, once, for Redis and the archive."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        blob = case.to_msgpack()
        self.effects.append(
            Effect(
                entry_id=entry_id,
                kind="opportunity" if case.side == "HOLD" else "loss",
                key=trade_key(case.trade_id),
                case=case,
                blob=blob,
                version=version_label(case.model_version),
                score=_score_arg(case),
                loss_pct=repr(float(case.loss_percentage)),
                payload=blob,
                event=_packed_event(events.case_added(case, worker, now_ms)),
                outcome=outcome[0],
                held_out=outcome[1],
                fields=fields,
                trade_id=case.trade_id,
            )
        )

    def add_outcome_only(
        self,
        kind: str,
        trade_id: str,
        model_version: int | None,
        entry_id: bytes = b"",
        fields: Mapping[bytes, bytes] | None = None,
        outcome: tuple[bytes, bool] = (b"", False),
    ) -> None:
        """Add a win or a skip (a HOLD that missed nothing): counted once per trade, never a
        case, its outcome replayed."""
        self.effects.append(
            Effect(
                entry_id,
                kind,
                key=trade_key(trade_id),
                version=version_label(model_version),
                outcome=outcome[0],
                held_out=outcome[1],
                fields=fields,
                trade_id=trade_id,
            )
        )

    def add_dead_letter(self, dead: DeadLetter, worker: str, now_ms: int) -> None:
        """Add an entry that cannot be used, with its original fields and the reason."""
        self.effects.append(
            Effect(
                entry_id=dead.entry_id,
                kind="dead",
                payload=packed_dead_letter(
                    dead.fields,
                    dead.field,
                    dead.reason,
                    entry_id=dead.entry_id,
                    consumer=worker,
                    at_ms=str(now_ms),
                ),
                event=_packed_event(
                    events.dead_lettered(
                        dead.entry_id.decode(),
                        dead.trade_id,
                        dead.field,
                        dead.reason,
                        worker,
                        now_ms,
                    )
                ),
                fields=dead.fields,
                trade_id=dead.trade_id,
            )
        )

    @property
    def cases(self) -> list[NegativeCase]:
        """The batch's losses, in entry order (duplicates included: the script decides)."""
        return [effect.case for effect in self.effects if effect.case is not None]

    @property
    def blobs(self) -> list[bytes]:
        """The stored form of each of `cases`."""
        return [effect.blob for effect in self.effects if effect.case is not None]

    def split(self) -> list[Batch]:
        """One batch per entry: to find the entry a whole batch could not be stored for."""
        return [Batch([effect]) for effect in self.effects]  # live scores went before

    def __len__(self) -> int:
        return len(self.effects)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """Caps a batch write keeps: stream lengths, and the idempotency record's window (ms) and
    size (trade keys)."""

    events_maxlen: int = 100_000
    dead_maxlen: int = 100_000
    trades_maxlen: int = 0
    seen_window_ms: int = 86_400_000
    seen_max: int = 2_000_000
    outcomes_maxlen: int = 5000
    validation_maxlen: int = 500


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a batch write did. `elsewhere`: entries another detector had recorded already."""

    added: int = 0
    duplicates: int = 0
    wins: int = 0
    dead_lettered: int = 0
    elsewhere: int = 0

    def __add__(self, other: Recorded) -> Recorded:
        return Recorded(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


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

    def record_batch(self, batch: Batch, limits: BatchLimits = BatchLimits()) -> Recorded:
        """Store a batch's cases, wins, dead letters, counters and events, and acknowledge
        its entries, atomically and exactly once per entry and per trade (DESIGN.md).
        Raises redis.ResponseError, having written nothing, when the batch cannot be stored."""
        keys = self.keys
        now_ms = int(time.time() * 1000)
        args: list[bytes | str | int] = [
            DETECTOR_GROUP,
            limits.events_maxlen,
            limits.dead_maxlen,
            RATE_TTL_S,
            limits.trades_maxlen,
            limits.seen_window_ms,
            limits.seen_max,
            limits.outcomes_maxlen,
            limits.validation_maxlen,
            len(batch.effects),
        ]
        for effect in batch.effects:
            args += effect.args()
        reply = self.acks.run_script(
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
                keys.seen,
                keys.retire,
                keys.outcomes,
                keys.validation,
                *(keys.case(case.case_id) for case in batch.cases),
            ],
            args=args,
        )
        return Recorded(*(int(n) for n in reply))

    def add(self, cases: Iterable[NegativeCase], worker: str) -> int:
        """Store and queue cases made without a trade (tools, tests, benchmarks) through the
        detector's batch write. Returns how many were new."""
        batch = Batch()
        for case in cases:
            batch.add_case(case, worker)
        return self.record_batch(batch).added

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


def _packed_event(event: Event) -> bytes:
    return msgpack.packb(list(chain.from_iterable(event.to_fields().items())))
