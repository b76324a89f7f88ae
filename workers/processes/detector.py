"""The loss detector: reads trade-close events, turns each loss into a NegativeCase, and
scores each decision a model version made in that version's live window."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import redis

from negcase.processes.losses import assess_trade, rule_pnl_pct
from negcase.runtime.logging import Progress
from negcase.runtime.loop import BURST_POLL_S, WorkerLoop
from negcase.runtime.metrics import DetectorMetrics
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.case import case_id_for
from negcase.schemas.trade import (
    TradeDefaults,
    TradeError,
    parse_trade,
    trade_id_hint,
)
from negcase.store.archive import Archive
from negcase.store.cases import Batch, BatchLimits, CaseStore, DeadLetter, Recorded
from negcase.store.health import HealthKey
from negcase.store.keys import DETECTOR_GROUP
from negcase.store.live import LiveOutcome, LiveScores
from negcase.store.queue import is_held_out
from negcase.store.retention import Retention
from negcase.store.serving import ServingControl
from negcase.store.streams import (
    Entry,
    claim_abandoned,
    entries_of,
    own_pending,
)

log = logging.getLogger(__name__)
# How often a detector retires finished cases past retention (store/retention.py).
RETIRE_EVERY_S = 1.0


@dataclass(slots=True)
class DetectorTotals:
    """What a detector did since it started."""

    entries: int = 0
    cases_added: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    wins: int = 0


class LossDetector:
    """One member of the `detectors` consumer group on the trades stream of one partition
    (`<ns>:trades` when there is one): its cases, queue and counters are that partition's;
    live windows, serving and health are the namespace's."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        consumer: str,
        archive: Archive | None,
        partition: int = 0,
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = settings.keys.partition(partition, settings.partitions)
        self.consumer = consumer
        self.archive = archive
        self.cases = CaseStore(client, self.keys, settings.replica_acks)
        self.live = LiveScores(client, settings.keys, settings.live_window)
        self.serving = ServingControl(client, settings)
        self.defaults = TradeDefaults(
            feature_count=settings.feature_count,
            leverage=settings.default_leverage,
            fee_rate=settings.default_fee_rate,
            max_entry_bytes=settings.max_entry_bytes,
        )
        self.limits = BatchLimits(
            events_maxlen=settings.events_maxlen,
            dead_maxlen=settings.dead_letters_maxlen,
            trades_maxlen=settings.trades_maxlen,
            seen_window_ms=round(settings.dedup_window_s * 1000),
            seen_max=settings.dedup_max_ids,
            outcomes_maxlen=settings.outcomes_maxlen,
            validation_maxlen=settings.validation_size,
        )
        self.retention = Retention.of(client, settings, self.keys)
        self.totals = DetectorTotals()
        self.metrics = DetectorMetrics()
        self.health: HealthKey | None = HealthKey(
            client, settings.keys, "detector", settings.health_ttl_s
        )
        # The detectors whose entries this one's health record counts (run_detectors).
        self.counted: list[LossDetector] = [self]
        self._retired_s = 0.0
        self._swept = False
        self._in_flight: Future[None] | None = None  # the batch being stored, if any
        self.progress = Progress(log, "stored")

    def run(self, stop: StopFlag, burst: bool = False) -> DetectorTotals:
        """Work until `stop` is set (or, in burst mode, until the stream is drained).

        Storing batch N (archive sync and the Lua script: waiting on disk and Redis) runs in
        a second thread while batch N+1 is read and assessed, so the two overlap. At most one
        batch is in flight, and a batch's entries stay pending until it is stored.
        """
        loop = WorkerLoop(
            "detector",
            stop,
            burst=burst,
            idle_s=BURST_POLL_S if burst else 0.0,
            health=self.health,
            health_info=lambda: {
                "consumer": self.consumer,
                "entries": sum(d.totals.entries for d in self.counted),
            },
            on_connect=self._recover,
            chore=self._claim_abandoned,
            chore_every_s=self.settings.claim_idle_ms / 2000,
            on_lost=self._abandon_in_flight,
            # Another detector may hold entries: wait for its ack, or to claim them.
            drained=lambda: not self._pending_elsewhere(),
            # Redis refusing writes (a full memory, a read-only replica) or the archive's disk
            # failing is no entry's fault (those become dead letters): back off, never die.
            survive_errors=True,
        )
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="detector-store") as storer:
            loop.run(lambda: self._step(storer, block=not burst))
            self._in_flight = _settled(self._in_flight)
        if self.archive is not None:
            self.archive.flush_index()
        return self.totals

    def _step(self, storer: ThreadPoolExecutor, block: bool) -> bool:
        """Read and assess a batch, then store it in `storer` while the next one is read.
        Returns whether there was a batch."""
        entries = self._read_new(block)
        if not entries:
            self._in_flight = _settled(self._in_flight)
            # A quiet spell, and no batch is being stored: say what the last busy one did.
            self.progress.flush_if_due()
            self._retire_due()
            return False
        batch = self.assess(entries)
        _settled(self._in_flight)
        self._in_flight = storer.submit(self.store, batch, len(entries))
        self._retire_due()
        return True

    def _recover(self) -> None:
        """Create the group if needed, catch the archive index up, and handle our own pending
        entries first: a restart under the same name resumes where the last run stopped."""
        # A batch whose store failed stays pending: it is read again just below.
        self._abandon_in_flight()
        self.ensure_group()
        if self.archive is not None:
            if not self._swept:
                # What a killed detector was writing: its temp files are not cases.
                self.archive.remove_stale_temps()
                self._swept = True
            self.archive.reconcile_index()
        for entries in self._own_pending():
            self.handle(entries)

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if they do not exist yet."""
        try:
            self.client.xgroup_create(self.keys.trades, DETECTOR_GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def handle(self, entries: list[Entry]) -> None:
        """Turn a batch of entries into cases and dead letters, archive, store, acknowledge."""
        self.store(self.assess(entries), len(entries))

    def store(self, batch: Batch, entry_count: int) -> None:
        """Archive a batch's cases, score its decisions in their versions' live windows, then
        record it and acknowledge its entries in one script, and take the serving step the
        new scores may call for. Scoring comes first and is idempotent, and the step reads
        only state: a crash anywhere in between repeats nothing twice."""
        started = time.perf_counter()
        if self.archive is not None:
            self.archive.add_cases(batch.cases, batch.blobs)
        self.live.record(batch.live)
        recorded = self._record(batch)
        if batch.live:
            self.serving.step()
        totals = self.totals
        totals.entries += entry_count
        totals.cases_added += recorded.added
        totals.duplicates += recorded.duplicates
        totals.dead_lettered += recorded.dead_lettered
        totals.wins += recorded.wins
        metrics = self.metrics
        metrics.batch_seconds.observe(time.perf_counter() - started)
        metrics.entries.inc(entry_count)
        metrics.cases.inc(recorded.added)
        metrics.duplicates.inc(recorded.duplicates)
        metrics.dead.inc(recorded.dead_lettered)
        self.progress.add(
            {
                "entries": entry_count,
                "cases added": recorded.added,
                "duplicates": recorded.duplicates,
                "dead-lettered": recorded.dead_lettered,
                "wins": recorded.wins,
            }
        )

    def _record(self, batch: Batch) -> Recorded:
        """Record a batch. When Redis refuses it (the script checks everything before its
        first write, so a refusal wrote nothing), record its entries one by one, and an
        entry Redis refuses alone as a dead letter with the refusal: no entry can wedge the
        group. A dead letter refused too means Redis refuses writes: that error is raised."""
        try:
            return self.cases.record_batch(batch, self.limits)
        except redis.ResponseError as error:
            if len(batch) > 1:
                log.warning(
                    "detector: a batch of %d was refused (%s); recording one by one",
                    len(batch),
                    error,
                )
                return sum((self._record(part) for part in batch.split()), Recorded())
            (effect,) = batch.effects
            if effect.kind == "dead" and effect.fields is None:
                raise  # even a bare dead letter: Redis refuses writes, the loop backs off
            # A refused dead letter is kept bare (fields None); anything else as a dead letter.
            fields = {} if effect.kind == "dead" else effect.fields or {}
            reason = f"could not be stored: {error}"
            dead = DeadLetter(effect.entry_id, fields, "entry", reason, effect.trade_id)
            unstorable = Batch()
            self._add_dead_letter(unstorable, dead, int(time.time() * 1000))
            if effect.kind == "dead":
                unstorable.effects[0].fields = None
            return self._record(unstorable)

    def assess(self, entries: list[Entry]) -> Batch:
        """Pure computation: what each entry becomes. No I/O. Anything an entry makes
        raise, however odd, makes it a dead letter: no input can stop the detector."""
        batch = Batch()
        now_ms = int(time.time() * 1000)
        for entry_id, fields in entries:
            try:
                self._assess_entry(batch, entry_id, fields, now_ms)
            except TradeError as error:
                hint = trade_id_hint(fields)
                dead = DeadLetter(entry_id, fields, error.field, error.reason, hint)
                self._add_dead_letter(batch, dead, now_ms)
            except Exception as error:
                # A bug met by some input: keep the entry, with the error, for a person to see.
                reason = f"could not be handled: {error!r}"
                dead = DeadLetter(entry_id, fields, "entry", reason, trade_id_hint(fields))
                self._add_dead_letter(batch, dead, now_ms)
        return batch

    def _assess_entry(
        self, batch: Batch, entry_id: bytes, fields: dict[bytes, bytes], now_ms: int
    ) -> None:
        trade = parse_trade(fields, self.defaults)
        assessment = assess_trade(trade, self.settings, now_ms)
        outcome = (b"", False)
        if assessment.outcome is not None:
            held_out = is_held_out(case_id_for(trade.trade_id), self.settings.heldout_share)
            outcome = (assessment.outcome.to_msgpack(), held_out)
        if assessment.case is not None:
            batch.add_case(assessment.case, self.consumer, now_ms, entry_id, fields, outcome)
        else:
            batch.add_outcome_only(
                assessment.kind, trade.trade_id, trade.model_version, entry_id, fields, outcome
            )
        if trade.model_version is not None:
            pnl_pct = None if trade.side == "HOLD" else assessment.pnl_pct
            rule = rule_pnl_pct(trade)
            batch.live.append(LiveOutcome(trade.trade_id, trade.model_version, pnl_pct, rule))

    def _add_dead_letter(self, batch: Batch, dead: DeadLetter, now_ms: int) -> None:
        """Add a dead letter; one whose fields cannot be packed is kept with its reason only."""
        try:
            batch.add_dead_letter(dead, self.consumer, now_ms)
        except Exception as error:
            reason = f"{dead.field}: {dead.reason}; original fields not kept ({error!r})"
            bare = DeadLetter(dead.entry_id, {}, "entry", reason)
            batch.add_dead_letter(bare, self.consumer, now_ms)

    def _retire_due(self) -> None:
        """Retire finished cases past retention, at most once every RETIRE_EVERY_S."""
        now = time.monotonic()
        if now - self._retired_s >= RETIRE_EVERY_S:
            self._retired_s = now
            self.retention.retire_cases()

    def _read_new(self, block: bool) -> list[Entry]:
        reply = self.client.xreadgroup(
            DETECTOR_GROUP,
            self.consumer,
            {self.keys.trades: ">"},
            count=self.settings.batch_size,
            block=self.settings.block_ms if block else None,
        )
        return entries_of(reply)

    def _own_pending(self) -> Iterator[list[Entry]]:
        return own_pending(
            self.client, self.keys.trades, DETECTOR_GROUP, self.consumer, self.settings.batch_size
        )

    def _claim_abandoned(self) -> None:
        """Handle entries another detector read but did not acknowledge for claim_idle_ms."""
        self._in_flight = _settled(self._in_flight)
        for entries in claim_abandoned(
            self.client,
            self.keys.trades,
            DETECTOR_GROUP,
            self.consumer,
            self.settings.claim_idle_ms,
            self.settings.batch_size,
        ):
            self.handle(entries)

    def _abandon_in_flight(self) -> None:
        """Redis is away: what was in flight stays pending and is read again later."""
        _abandoned(self._in_flight)
        self._in_flight = None

    def _pending_elsewhere(self) -> bool:
        """Whether entries are still pending in the group (burst mode waits for them)."""
        summary = self.client.xpending(self.keys.trades, DETECTOR_GROUP)
        return bool(summary and summary.get("pending"))


def run_detectors(detectors: list[LossDetector], stop: StopFlag, burst: bool) -> DetectorTotals:
    """Run detectors of different partitions side by side, the first in this thread and each
    other in one of its own, until `stop` (or, in burst mode, until each stream is drained);
    returns their totals added up. They share the process's one health key (its id is
    the process's): the first detector refreshes it with every detector's entries."""
    for detector in detectors[1:]:
        detector.health = None
    detectors[0].counted = list(detectors)
    threads = [
        threading.Thread(target=d.run, args=(stop, burst), name=f"detector-{i}", daemon=True)
        for i, d in enumerate(detectors[1:], start=1)
    ]
    for thread in threads:
        thread.start()
    detectors[0].run(stop, burst=burst)
    for thread in threads:
        thread.join()
    totals = DetectorTotals()
    for detector in detectors:
        for name in DetectorTotals.__slots__:
            setattr(totals, name, getattr(totals, name) + getattr(detector.totals, name))
    return totals


def _settled(in_flight: Future[None] | None) -> None:
    """Wait for the batch in flight to be stored; its error, if any, is raised here."""
    if in_flight is not None:
        in_flight.result()


def _abandoned(in_flight: Future[None] | None) -> None:
    """Wait for the batch in flight, ignoring its error: its entries stay pending."""
    if in_flight is not None:
        with contextlib.suppress(Exception):
            in_flight.result()
