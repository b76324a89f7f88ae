"""The inference worker: answers signal requests from `<ns>:signals:requests` in batches with
the model in service (and a canary for its share of requests), while the reloader swaps in
what serving names."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import redis

from negcase.processes.reloader import Reloader, Serving
from negcase.runtime.logging import Progress
from negcase.runtime.loop import BURST_POLL_S, WorkerLoop
from negcase.runtime.metrics import InferenceMetrics
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.signal import (
    SignalRequestError,
    check_request_size,
    error_reply,
    features_into,
    request_id_of,
    signal_from_probabilities,
)
from negcase.store.health import HealthKey
from negcase.store.signals import DeadRequest, ReplyBatch, SignalStore
from negcase.store.streams import Entry

log = logging.getLogger(__name__)

NO_MODEL_REASON = "no checkpoint published yet"
NONFINITE_OUTPUT_REASON = "the model's output is not finite for these features (too large?)"
DELETED_REASON = "deleted before it was answered (the stream was trimmed)"


@dataclass(slots=True)
class ServeTotals:
    """What a worker did since it started."""

    batches: int = 0
    signals: int = 0
    errors: int = 0
    dead: int = 0


class InferenceWorker:
    """One member of the `inference` consumer group on `<ns>:signals:requests`."""

    def __init__(
        self, client: redis.Redis, settings: Settings, consumer: str, reloader: Reloader
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.reloader = reloader
        self.store = SignalStore(
            client, settings.keys, settings.reply_ttl_s, settings.dead_letters_maxlen
        )
        # One buffer for every batch: requests are decoded straight into its rows.
        self.features = np.empty((settings.serve_batch_size, settings.feature_count), np.float32)
        self.totals = ServeTotals()
        self.metrics = InferenceMetrics()
        self.health = HealthKey(client, settings.keys, "inference", settings.health_ttl_s)
        self.progress = Progress(log, "answered")

    def run(self, stop: StopFlag, burst: bool = False) -> ServeTotals:
        """Answer requests until `stop` is set (or, in burst mode, until none are left)."""
        loop = WorkerLoop(
            "serve",
            stop,
            burst=burst,
            # Another worker may hold requests: wait for it, or to claim them.
            idle_s=BURST_POLL_S if burst else 0.0,
            health=self.health,
            health_info=self._health_info,
            on_connect=self.store.ensure_group,
            chore=self._answer_abandoned,
            chore_every_s=self.settings.claim_idle_ms / 2000,
            drained=lambda: self.store.pending() == 0,
        )
        loop.run(lambda: self._step(block_ms=None if burst else self.settings.block_ms))
        return self.totals

    def _step(self, block_ms: int | None) -> bool:
        """Answer one batch of new requests. Returns whether there was one."""
        entries = self.store.read_new(self.consumer, self.settings.serve_batch_size, block_ms)
        if entries:
            self.handle(entries)
        else:
            self.progress.flush_if_due()  # a quiet spell: say what the last busy one did
        return bool(entries)

    def _health_info(self) -> dict[str, object]:
        # The served-version gauge follows the health key, so an idle worker's is fresh too.
        live = self.reloader.live
        version = None if live is None else live.version
        if version is not None:
            self.metrics.model_version.set(version)
        canary = self.reloader.serving.canary
        return {
            "consumer": self.consumer,
            "version": version,
            "canary": None if canary is None else canary.version,
            "signals": self.totals.signals,
        }

    def handle(self, entries: list[Entry]) -> None:
        """Answer a batch with the models serving now and write every reply in one round
        trip."""
        started = time.perf_counter()
        batch = self.answer(entries, self.reloader.serving)
        self.store.write(batch)
        counters = batch.counters
        self.progress.add(
            {
                "batches": 1,
                "signals": counters.get("signals", 0),
                "error replies": counters.get("signal_errors", 0),
                "unanswerable": len(batch.dead),
            }
        )
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def answer(self, entries: list[Entry], serving: Serving) -> ReplyBatch:
        """Pure computation: the reply to every entry, from `serving` alone. No I/O."""
        totals = self.totals
        number = totals.batches
        totals.batches += 1
        loaded = serving.service
        version = None if loaded is None else loaded.version
        batch = ReplyBatch(handled_ids=[entry_id for entry_id, _ in entries])
        request_ids: list[str] = []
        max_bytes = self.settings.max_request_bytes
        for entry_id, fields in entries:
            try:
                if not fields:  # XADD needs a field: only a deleted entry has none
                    raise SignalRequestError("request", DELETED_REASON)
                request_id = request_id_of(fields)
            except SignalRequestError as error:
                # No reply key to answer on: keep it, with the reason, for people.
                batch.dead.append(DeadRequest(entry_id, fields, error.field, error.reason))
                continue
            try:
                check_request_size(fields, max_bytes)
                if loaded is None:
                    raise SignalRequestError("model", NO_MODEL_REASON)
                features_into(fields.get(b"features"), self.features[len(request_ids)])
            except SignalRequestError as error:
                reply = error_reply(
                    request_id, error.field, error.reason, version, self.consumer, number
                )
                batch.replies.append((request_id, reply))
                continue
            request_ids.append(request_id)
        signals = {False: 0, True: 0}  # answered with a signal, by the service / canary
        if request_ids:
            on_trial = self._on_trial(serving, request_ids)
            rows = self._forward(serving, on_trial)
            setting = self.settings.min_confidence
            for request_id, probabilities, canary in zip(
                request_ids, rows, on_trial.tolist(), strict=True
            ):
                model = serving.canary if canary else loaded
                if not all(map(math.isfinite, probabilities)):
                    # Finite float32 inputs can still overflow a forward pass: no signal
                    # from NaN, an error naming the input instead.
                    reply = error_reply(
                        request_id,
                        "features",
                        NONFINITE_OUTPUT_REASON,
                        model.version,
                        self.consumer,
                        number,
                    )
                    batch.replies.append((request_id, reply))
                    continue
                signals[canary] += 1
                signal = signal_from_probabilities(
                    probabilities,
                    model.version,
                    request_id,
                    self.consumer,
                    number,
                    min_confidence=serving.min_confidence(canary, setting),
                    canary=canary,
                )
                batch.replies.append((request_id, signal.to_json()))
            batch.count(f"model:{version}:signals", signals[False])
            if signals[True]:
                batch.count(f"model:{serving.canary.version}:signals", signals[True])
                batch.count("signals_canary", signals[True])
        self._count(batch, signals[False] + signals[True], len(entries))
        return batch

    @staticmethod
    def _on_trial(serving: Serving, request_ids: list[str]) -> np.ndarray:
        """Which requests the canary answers (all False without one)."""
        if serving.canary is None:
            return np.zeros(len(request_ids), bool)
        return np.fromiter(map(serving.takes_canary, request_ids), bool, len(request_ids))

    def _forward(self, serving: Serving, on_trial: np.ndarray) -> list[list[float]]:
        """Probabilities for each decoded row: one forward pass per model that has rows."""
        features = self.features[: len(on_trial)]
        if not on_trial.any():
            return serving.service.probabilities(features).tolist()
        rows = np.empty((len(on_trial), 3), np.float32)
        for model, chosen in ((serving.service, ~on_trial), (serving.canary, on_trial)):
            if chosen.any():
                rows[chosen] = model.probabilities(features[chosen])
        return rows.tolist()

    def _count(self, batch: ReplyBatch, signals: int, entries: int) -> None:
        errors = entries - signals - len(batch.dead)
        batch.count("signals", signals)
        batch.count("signal_errors", errors)
        batch.count("signals_dead", len(batch.dead))
        totals = self.totals
        totals.signals += signals
        totals.errors += errors
        totals.dead += len(batch.dead)
        requests = self.metrics.requests
        requests.labels("signal").inc(signals)
        requests.labels("error").inc(errors)
        requests.labels("unanswerable").inc(len(batch.dead))

    def _answer_abandoned(self) -> None:
        """Answer requests a worker that died mid-batch left unanswered; their engines may
        have given up, but the replies expire and the stream is left clean."""
        for entries in self.store.claim_abandoned(
            self.consumer, self.settings.claim_idle_ms, self.settings.serve_batch_size
        ):
            self.handle(entries)
