"""The real loop, for a backtest: a namespace of its own, the loss detector, trainers and an
inference worker as processes, and an engine-side view that publishes one closed trade at
a time and waits (bounded) until the pipeline has handled it, so that what is learned from
bar t is served at bar t + 1, as it would be live: by the version in service, or by a canary
on trial for its share of decisions (chosen by the decision's id, the bar's trade id)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from negcase.client.signal_client import SignalClient, SignalTimeout
from negcase.client.trades import encode_trade
from negcase.runtime.settings import Settings
from negcase.schemas.signal import Signal, SignalRequestError
from negcase.sim.demo import start_workers, wait_for_signals
from negcase.sim.supervisor import Supervisor
from negcase.store.keys import DETECTOR_GROUP
from negcase.store.serving import ServingChange, ServingControl, answering_version, read_state
from negcase.store.streams import entries_of

log = logging.getLogger(__name__)

# Between two looks at the pipeline, wait on <ns>:events this long at most: a case, a
# session or a reload wakes the wait at once; a win makes no event, so it costs one nap.
NAP_MS = 10
REQUEST_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 120.0
# Serving steps before a decision, at most: each makes one change, and few are due at once.
SETTLE_STEPS = 4


class PipelineError(RuntimeError):
    """A worker of the pipeline exited while the backtest needed it."""


def backtest_namespace(configured: str) -> str:
    """A fresh namespace that no live deployment uses; hash-tagged like the configured one
    (`{negcase}` on a Redis Cluster), so every multi-key script still touches one slot."""
    name = f"negcase-backtest-{os.urandom(4).hex()}"
    return f"{{{name}}}" if configured.startswith("{") else name


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a comparable (milliseconds, sequence) pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, sequence = text.partition("-")
    return int(ms), int(sequence or 0)


class Pipeline:
    """The workers one backtest started, and the engine's side of them."""

    def __init__(
        self, client: redis.Redis, settings: Settings, supervisor: Supervisor, catch_up_s: float
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = settings.keys
        self.supervisor = supervisor
        self.catch_up_s = catch_up_s
        self.signals = SignalClient(client, settings.namespace, settings.feature_count)
        self.serving = ServingControl(client, settings)
        self.waits = 0
        self.late = 0
        self.failed_requests = 0
        self._events_cursor: bytes | str = "0-0"

    def start(self, trainers: int) -> None:
        """Start the detector, `trainers` trainers and the inference worker; return once
        inference answers (that no checkpoint exists yet) and the detector's group exists."""
        # One case per claim: cases reach the trainers one at a time anyway, and a batch
        # would make a session depend on how many cases arrived before a claim.
        start_workers(self.supervisor, "backtest", trainers, batch=1)
        feature_count = self.settings.feature_count
        wait_for_signals(self.signals, feature_count, self.supervisor, STARTUP_TIMEOUT_S)
        self._wait_for(self._detector_group, STARTUP_TIMEOUT_S, "the detector to start")

    def publish(self, trade: dict[str, Any]) -> None:
        """XADD one closed trade, then wait until the detector has handled it and no case is
        queued or leased (each was trained and published, refused by the gate, held out or
        given up on)."""
        entry_id = self.client.xadd(self.keys.trades, encode_trade(trade, "flat"))
        self.waits += 1
        if not self._wait_for(lambda: self._handled(entry_id), self.catch_up_s, "the pipeline"):
            self.late += 1

    def ask(self, features: Sequence[float], decision_id: str) -> Signal | None:
        """The signal for one decision from what serves now (the version in service, or the
        canary for its share of decisions), waiting (bounded) until inference serves that;
        None when there is no checkpoint yet, or no answer came (a real engine would then
        use its own rule too). The serving step is taken first, so that every outcome
        recorded so far has had its say, whichever process would have taken it live."""
        self._settle()
        deadline_s = time.monotonic() + self.catch_up_s
        while True:
            state = read_state(self.client, self.keys)
            signal = self._request(features, decision_id)
            expected = answering_version(state, decision_id)
            if expected is None or (signal is not None and signal.model_version == expected):
                return signal
            if time.monotonic() > deadline_s:
                served = None if signal is None else signal.model_version
                log.warning(
                    "after %.0f s inference serves v%s, not v%s", self.catch_up_s, served, expected
                )
                self.late += 1
                return signal
            self._nap()

    def _settle(self) -> None:
        settle(self.serving)

    def stop(self) -> dict[str, int]:
        """Stop every worker; their exit codes."""
        return self.supervisor.stop_all()

    def _request(self, features: Sequence[float], decision_id: str) -> Signal | None:
        try:
            return self.signals.request(
                features, timeout_s=REQUEST_TIMEOUT_S, request_id=decision_id
            )
        except SignalRequestError as error:
            if error.field == "model":  # no checkpoint loaded yet
                return None
            raise
        except SignalTimeout:
            self.failed_requests += 1
            return None

    def _handled(self, entry_id: bytes) -> bool:
        pipe = self.client.pipeline(transaction=False)
        pipe.xinfo_groups(self.keys.trades)
        pipe.zcard(self.keys.queue)
        pipe.zcard(self.keys.leased)
        pipe.exists(self.keys.latest)
        pipe.hget(self.keys.stats, "outcomes")
        groups, queued, leased, has_model, outcomes = pipe.execute()
        group = _detector_group_of(groups)
        # Before the first checkpoint, trainers leave cases queued until enough outcomes
        # exist for the warm start: nothing to wait for then.
        waiting = not has_model and int(outcomes or 0) < self.settings.min_outcomes
        return (
            group is not None
            and group["pending"] == 0
            and stream_id(group["last-delivered-id"]) >= stream_id(entry_id)
            and (waiting or (queued == 0 and leased == 0))
        )

    def _detector_group(self) -> bool:
        try:
            return _detector_group_of(self.client.xinfo_groups(self.keys.trades)) is not None
        except redis.ResponseError:  # no stream yet: the detector creates it with its group
            return False

    def _wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> bool:
        """Wait until `condition` holds; False when `timeout_s` ran out first. A worker that
        exited is an error: nothing would ever catch up."""
        deadline_s = time.monotonic() + timeout_s
        while not condition():
            if crashed := self.supervisor.exited():
                raise PipelineError(
                    f"a worker exited: {crashed} (logs in {self.supervisor.log_dir})"
                )
            if time.monotonic() > deadline_s:
                log.warning("waited %.0f s for %s; going on without it", timeout_s, what)
                return False
            self._nap()
        return True

    def _nap(self) -> None:
        """Until the next event on <ns>:events, or NAP_MS."""
        reply = self.client.xread({self.keys.events: self._events_cursor}, block=NAP_MS, count=500)
        if entries := entries_of(reply):
            self._events_cursor = entries[-1][0]


def settle(serving: ServingControl) -> list[ServingChange]:
    """Take serving steps until nothing changes (a promotion can start the next canary, in
    the step after it); the changes made, at most SETTLE_STEPS."""
    changes = []
    for _ in range(SETTLE_STEPS):
        change = serving.step()
        if change is None:
            break
        changes.append(change)
    return changes


def _detector_group_of(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    for group in groups:
        name = group["name"]
        if (name.decode() if isinstance(name, bytes) else name) == DETECTOR_GROUP:
            return group
    return None
