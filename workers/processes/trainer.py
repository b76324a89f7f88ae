"""The training worker: claim the worst cases, train intensively beside a replay of recent
outcomes, gate by trading result, publish, acknowledge. No checkpoint is published before
NEGCASE_MIN_OUTCOMES outcomes exist; the first is a warm start on all of them. Any number
of trainers share one queue and one model lineage (`negcase train`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence

import redis
import torch

from negcase.processes.model import (
    CheckpointError,
    build_model,
    spec_from_settings,
    state_of,
    verified_state,
)
from negcase.processes.publishing import publish_update
from negcase.processes.training import (
    Examples,
    TrainingInterrupted,
    Update,
    fit_history,
    improvements,
    measure,
    measurement_dict,
    train_on_cases,
)
from negcase.runtime.loop import REDIS_AWAY, WorkerLoop
from negcase.runtime.metrics import TrainerMetrics
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.case import NegativeCase, case_problem
from negcase.schemas.session import TrainingSession
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.health import HealthKey
from negcase.store.leases import Lease, LeaseLost
from negcase.store.outcomes import OutcomeStore
from negcase.store.partitions import CaseQueues, by_partition
from negcase.store.queue import priority_of_score
from negcase.store.replication import ReplicaAcksMissing
from negcase.store.retention import Retention
from negcase.store.serving import ServingControl
from negcase.store.sessions import SessionStore

State = dict[str, torch.Tensor]
log = logging.getLogger(__name__)
# Upkeep runs every quarter lease, at most this far apart.
UPKEEP_EVERY_S = 1.0


class Heartbeat:
    """Extends the leases from a thread while training runs, so that a long step cannot let
    them lapse; sets `lost` when Redis says one is no longer ours. It also calls `on_beat`
    (the health key's refresh, itself rate-limited) at least every `health_every_s`: a
    session or a wait for the publish lock longer than the health TTL must not make a busy
    trainer look dead."""

    def __init__(
        self,
        queue: CaseQueues,
        leases: Sequence[Lease],
        interval_s: float,
        on_beat: Callable[[], None] | None = None,
        health_every_s: float = math.inf,
    ) -> None:
        self.queue = queue
        self.leases = list(leases)
        self.session_id = ""  # set once the session is stored: it is kept open too
        self.interval_s = interval_s
        self.on_beat = on_beat
        self.tick_s = min(interval_s, health_every_s)
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        lease_due_s = time.monotonic() + self.interval_s
        while not self._done.wait(self.tick_s):
            if self.on_beat is not None:
                with contextlib.suppress(redis.RedisError):
                    self.on_beat()
            if time.monotonic() < lease_due_s:
                continue
            try:
                # Once a lease is lost only the session is kept open: this trainer is alive
                # and closes it itself.
                leases = [] if self.lost.is_set() else self.leases
                if self.queue.heartbeat(leases, self.session_id):
                    self.lost.set()  # keep ticking: the health key still needs refreshing
                lease_due_s = time.monotonic() + self.interval_s
            except redis.RedisError:
                continue  # Redis is away: try again; if the lease lapses, fencing refuses us


class Upkeep:
    """A thread that runs the shared upkeep steps (reap expired leases, close abandoned
    sessions, retire finished cases) at once and then every `every_s`, whatever the
    trainer's main thread is doing: training, or waiting for the publish lock. So reaping
    never waits on a session or on the lock."""

    def __init__(self, steps: Sequence[Callable[[], object]], every_s: float) -> None:
        self.steps = list(steps)
        self.every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upkeep", daemon=True)

    def __enter__(self) -> Upkeep:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for step in self.steps:
                try:
                    step()
                except (redis.RedisError, OSError) as error:
                    # Redis away or refusing: the next tick tries again.
                    log.debug("upkeep: %s: %s", type(error).__name__, error)
                except Exception:
                    # Anything else is a bug, but the thread must not die of it: reaping
                    # stops for every trainer that waits on this one's leases otherwise.
                    log.exception("upkeep: %s failed; trying again next tick", step)
            if self._done.wait(self.every_s):
                return


class Trainer:
    """One training worker."""

    def __init__(
        self, client: redis.Redis, settings: Settings, name: str, archive: Archive | None
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = settings.keys
        self.name = name
        self.archive = archive
        self.queue = CaseQueues.of_settings(client, settings)
        self.registry = CheckpointRegistry(
            client,
            self.keys,
            archive,
            settings.keep_checkpoints,
            settings.events_maxlen,
            settings.replica_acks,
            self.queue,
            round(settings.dedup_window_s * 1000),
        )
        self.serving = ServingControl(client, settings)
        self.sessions = SessionStore(
            client, self.keys, archive, settings.events_maxlen, settings.sessions_kept
        )
        self.retentions = [Retention.of(client, settings, part) for part in settings.partition_keys]
        self.outcome_store = OutcomeStore(
            client, self.keys, settings.outcomes_maxlen, settings.partitions
        )
        self.spec = spec_from_settings(settings)
        self.scratch = build_model(self.spec)  # verifies and measures checkpoints
        self.rng = random.Random(f"{settings.seed}:{name}")
        self.outcomes: Counter[str] = Counter()
        self.metrics = TrainerMetrics()
        self.health = HealthKey(client, self.keys, "trainer", settings.health_ttl_s)
        self._base: tuple[int | None, State] | None = None
        self._waiting_for_outcomes = False
        # A session Redis cut off before it was closed: closed once Redis is back.
        self._unfinished: TrainingSession | None = None

    def run(self, stop: StopFlag, burst: bool = False) -> Counter[str]:
        """Work until `stop` is set (in burst mode, until nothing is queued or leased)."""
        loop = WorkerLoop(
            self.name,
            stop,
            burst=burst,
            # Nothing to claim: wait for other trainers' leases to be acked or to expire.
            idle_s=min(0.25, self.settings.lease_s / 4),
            health=self.health,
            health_info=self._health_info,
            on_connect=self._recover,
            drained=self._drained,
        )
        upkeep = Upkeep(
            [
                self.queue.reap,
                self.sessions.close_abandoned,
                *(retention.retire_cases for retention in self.retentions),
            ],
            min(UPKEEP_EVERY_S, self.settings.lease_s / 4),
        )
        with upkeep:
            self._settle_archive()
            loop.run(lambda: self._step(stop))
            with contextlib.suppress(redis.RedisError, OSError):
                self._recover()
        if self.archive is not None:
            self.archive.flush_index()
        return self.outcomes

    def _step(self, stop: StopFlag) -> bool:
        """Claim the best cases and train on them (the upkeep thread reaps expired leases).
        Returns whether there were cases to claim."""
        if not self._enough_outcomes():
            return False
        leases = self.queue.claim(self.name, self.settings.cases_per_claim)
        if leases:
            self.train_claimed(leases, stop)
        return bool(leases)

    def _recover(self) -> None:
        """On (re)connecting: settle the archive files of a publish whose reply was lost,
        and close the session Redis cut off."""
        self.registry.settle_pending()
        if self._unfinished is not None:
            self._complete_session(self._unfinished)

    def _settle_archive(self) -> None:
        """Once, at start: settle unpublished checkpoint files killed trainers left, and
        remove their temp files. The publish lock is taken only when there is something to
        settle, and not waited for long: another trainer holding it settles later."""
        if self.archive is None:
            return
        with contextlib.suppress(TimeoutError, redis.RedisError, OSError):
            self.archive.remove_stale_temps()
            if self.registry.has_unpublished():
                with self.registry.publish_lock(wait_s=1.0):
                    self.registry.settle_unpublished()

    def _enough_outcomes(self) -> bool:
        """Whether a session may run: a checkpoint exists, or enough outcomes for the warm
        start that makes the first one (a first model from one case is a constant policy)."""
        if self.registry.latest_version() is not None:
            self._waiting_for_outcomes = False
            return True
        seen, needed = self.outcome_store.seen(), self.settings.min_outcomes
        waiting = seen < needed
        if waiting and not self._waiting_for_outcomes:
            log.info(
                "waiting for %d outcomes before the first checkpoint (%d so far)", needed, seen
            )
        self._waiting_for_outcomes = waiting
        return not waiting

    def refresh_health(self) -> None:
        """Refresh this trainer's health key if due (rate-limited; safe from any thread)."""
        self.health.refresh(**self._health_info())

    def _health_info(self) -> dict[str, object]:
        return {"name": self.name, "sessions": sum(self.outcomes.values())}

    def train_claimed(self, leases: list[Lease], stop: StopFlag) -> TrainingSession | None:
        """One intensive session on claimed cases; every lease ends acked, given back or
        failed (or lost to another worker). Returns the session, or None if no case was
        usable."""
        leases, cases = self._usable(leases)
        if not leases:
            return None
        with Heartbeat(
            self.queue,
            leases,
            self.settings.lease_s / 3,
            self.refresh_health,
            self.health.every_s,
        ) as heartbeat:
            session = self._start_session(leases, cases)
            heartbeat.session_id = session.session_id
            # Until it is closed: a session Redis cuts off is closed when Redis is back.
            self._unfinished = session
            try:
                self._train(
                    session, leases, cases, lambda: stop.is_set() or heartbeat.lost.is_set()
                )
            except TrainingInterrupted:
                if heartbeat.lost.is_set():
                    session.outcome = "lease_lost"
                else:
                    self.queue.release(leases, self.name)
                    session.outcome = "interrupted"
            except LeaseLost as error:
                session.outcome, session.error = "lease_lost", str(error)
            except CheckpointError as error:
                # Not the cases' fault: hand them back and let an operator roll back.
                self.queue.release(leases, self.name)
                session.outcome, session.error = "failed", f"latest checkpoint: {error.reason}"
                stop.wait(self.settings.lease_s)
            except ReplicaAcksMissing as error:
                # The write stands on the primary, but no replica confirmed it in time: hand
                # back what is still ours (no attempt counted; a publish finished its cases
                # already, so for it nothing is), rather than count on one machine; the
                # loop backs off, then closes this session.
                self.queue.release(leases, self.name)
                session.outcome, session.error = "cut_off", str(error)
                raise
            except REDIS_AWAY as error:
                # Redis is away, not the cases' fault: their leases expire and are reaped;
                # the loop backs off, then closes this session (on_connect).
                session.outcome = "cut_off"
                session.error = f"{type(error).__name__}: {error}"
                raise
            except Exception as error:
                self.queue.fail(leases, f"{type(error).__name__}: {error}", self.name)
                session.outcome, session.error = "failed", f"{type(error).__name__}: {error}"
        self._complete_session(session)
        return session

    def _usable(self, leases: list[Lease]) -> tuple[list[Lease], list[NegativeCase]]:
        """The leases whose cases can be trained; the others fail with the reason."""
        stored = [
            case
            for partition, held in by_partition(leases).items()
            for case in CaseStore(self.client, self.queue.queues[partition].keys).get_many(
                lease.case_id for lease in held
            )
        ]
        found = {case.case_id: case for case in stored}
        good: list[tuple[Lease, NegativeCase]] = []
        for lease in leases:
            case = found.get(lease.case_id)
            fc = self.settings.feature_count
            problem = "case not found" if case is None else case_problem(case, fc)
            if problem:
                self.queue.fail([lease], problem, self.name)
            else:
                good.append((lease, case))
        return [lease for lease, _ in good], [case for _, case in good]

    def _train(
        self,
        session: TrainingSession,
        leases: list[Lease],
        cases: list[NegativeCase],
        should_stop: Callable[[], bool],
    ) -> None:
        settings = self.settings
        fc = settings.feature_count
        # Build on what the live logic has decided by now: the outcomes that queued these
        # cases may end a trial (a retired canary sets latest back), and whether the detector
        # took that step yet must not change what is trained from (one trainer and a seed
        # give the same lineage every run). A step that fails is not these cases' fault.
        try:
            self.serving.step()
        except (redis.ResponseError, ValueError) as error:
            log.warning("serving step before training failed (%s); building on latest", error)
        base_version, base_state = self._base_state()
        session.base_version = base_version
        replay = self.outcome_store.replay()
        window = self.outcome_store.validation_window(settings.validation_size)
        new = Examples.of(cases, fc)
        history = Examples.of_outcomes(replay, fc)
        model = build_model(self.spec)
        model.load_state_dict(base_state)
        case_before = measure(model, new)
        generator = torch.Generator().manual_seed(self.rng.getrandbits(63))
        if base_version is None:
            # The first checkpoint: a model of every outcome so far, not of one case (the
            # claimed cases too: a producer may queue cases without reporting outcomes).
            everything = history.plus(new)
            epochs = fit_history(
                model, everything, settings.warm_start_epochs, should_stop, generator
            )
            early = False
        else:
            epochs, early = train_on_cases(
                model,
                new,
                history,
                session.epochs_planned,
                settings.learning_rate,
                settings.anchor_weight,
                settings.early_stop_patience,
                should_stop,
                generator,
            )
        case_after = measure(model, new)
        session.epochs_completed, session.stopped_early = epochs, early
        meta = {
            "feature_count": fc,
            "model_spec": self.spec.to_dict(),
            "case_ids": session.case_ids,
            "metrics": {
                "case_before": case_before.to_dict() if case_before else None,
                "case_after": case_after.to_dict() if case_after else None,
                "epochs": epochs,
                "stopped_early": early,
                "warm_start": base_version is None,
                "replay_count": len(replay),
                "validation_count": len(window),
            },
        }
        update = Update(base_version, base_state, state_of(model))
        retrained = self._retrained(cases)
        blobs = {case.case_id: case.to_msgpack() for case in retrained}
        result = publish_update(
            self.registry,
            update,
            self.scratch,
            fc,
            window,
            meta,
            leases,
            self.name,
            blobs,
        )
        if result.rejected_reason:
            # Published updates finished their cases in the publish step itself.
            self.queue.ack(leases, blobs, result.rejected_reason)
        if self.archive is not None:
            for case in retrained:
                self.archive.replace_case(case)
        if result.version is not None:
            self.serving.step()  # the new version starts as the canary (or serves at once)
        session.outcome = "rejected" if result.rejected_reason else "published"
        session.published_version = result.version
        session.rejected_reason = result.rejected_reason
        session.rebases = result.rebases
        session.cases_trained = len(cases)
        session.metrics = {
            **meta["metrics"],
            "parent_version": result.parent_version,
            "heldout_before": measurement_dict(result.heldout_before),
            "heldout_after": measurement_dict(result.heldout_after),
            **result.trading_dict(),
        }
        session.loss_improvement, session.accuracy_improvement = improvements(
            result.heldout_before, result.heldout_after
        )

    def _base_state(self) -> tuple[int | None, State]:
        """The latest checkpoint's weights (verified, cached by version), or the seeded
        initial weights before the first publish."""
        version = self.registry.latest_version()
        if self._base is not None and self._base[0] == version:
            return self._base
        stored = self.registry.fetch_latest()
        if stored is None:
            torch.manual_seed(self.settings.seed)  # every trainer starts from the same weights
            self._base = (None, state_of(build_model(self.spec)))
        else:
            self._base = (
                stored.version,
                verified_state(stored, self.scratch, self.settings.feature_count),
            )
        return self._base

    @staticmethod
    def _retrained(cases: list[NegativeCase]) -> list[NegativeCase]:
        """The cases as they are stored once trained: one more retraining, and when."""
        now_ms = int(time.time() * 1000)
        return [
            dataclasses.replace(
                case, retraining_count=case.retraining_count + 1, last_retrained_ms=now_ms
            )
            for case in cases
        ]

    def _start_session(self, leases: list[Lease], cases: list[NegativeCase]) -> TrainingSession:
        now_ms = int(time.time() * 1000)
        session = TrainingSession(
            session_id=f"s-{now_ms}-{uuid.uuid4().hex[:8]}",
            trainer=self.name,
            start_time_ms=now_ms,
            case_ids=[lease.case_id for lease in leases],
            base_version=self.registry.latest_version(),
            epochs_planned=max(case.training_epochs for case in cases),
        )
        self.sessions.started(session, now_ms, now_ms + round(self.settings.lease_s * 1000))
        priorities = ",".join(str(priority_of_score(lease.score)) for lease in leases)
        base = "none" if session.base_version is None else f"v{session.base_version}"
        log.info(
            f"{self.name} claimed {', '.join(session.case_ids)} (priority {priorities}): session "
            f"{session.session_id}, {session.epochs_planned} epochs, base {base}"
        )
        return session

    def _complete_session(self, session: TrainingSession) -> None:
        now_ms = int(time.time() * 1000)
        session.training_active = False
        session.outcome = session.outcome or "cut_off"
        session.duration_s = round((now_ms - session.start_time_ms) / 1000, 3)
        self.sessions.completed(session, now_ms)
        self._unfinished = None
        self.outcomes[session.outcome or "unknown"] += 1
        self.metrics.sessions.labels(session.outcome or "unknown").inc()
        self.metrics.session_seconds.observe(session.duration_s)
        self.metrics.epochs.inc(session.epochs_completed)
        result = f", v{session.published_version}" if session.published_version else ""
        log.info(f"{self.name}: session {session.session_id}: {session.summary()}{result}")

    def _drained(self) -> bool:
        # In burst mode, cases that must wait for more outcomes count as nothing to do.
        if self._waiting_for_outcomes:
            return True
        counts = self.queue.counts()
        return counts["queued"] == 0 and counts["leased"] == 0
