"""Hot reload: follow `<ns>:checkpoints` in a thread of its own, load what `<ns>:serving`
names (the version in service and, on trial, a canary) beside the models in use, verify
them, and swap the reference that serving reads.

Serving never waits for a load: it reads `Reloader.serving` once per batch (one attribute
read, atomic under the GIL) and uses those models for the whole batch. A load builds a fresh
model, so a model a batch is using is never written to.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import redis
import torch
from torch import nn

from negcase.processes.model import (
    CheckpointError,
    ModelSpec,
    build_model,
    load_verified,
    spec_from_settings,
)
from negcase.runtime.loop import WorkerLoop
from negcase.runtime.settings import Settings
from negcase.schemas import event as events
from negcase.schemas.event import Event
from negcase.store.checkpoints import CheckpointMissing, CheckpointRegistry, StoredCheckpoint
from negcase.store.serving import ServingControl, read_state, takes_canary
from negcase.store.streams import entries_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified model in eval mode and the checkpoint version it was loaded from."""

    version: int
    model: nn.Module

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Softmax over (BUY, SELL, HOLD) for each row of a float32 (rows, features) array:
        one forward pass."""
        with torch.inference_mode():
            return torch.softmax(self.model(torch.from_numpy(features)), dim=1).numpy()


@dataclass(frozen=True, slots=True)
class Serving:
    """What a worker answers with: the model in service and, on trial, a canary that
    answers `canary_share` of the requests, chosen by request id."""

    service: LoadedModel | None = None
    canary: LoadedModel | None = None
    canary_share: float = 0.0
    epoch: int = 0
    # The version in service defers to the engine's own rule (store/serving.py).
    service_defers: bool = False

    def takes_canary(self, request_id: str) -> bool:
        """Whether the canary answers this request (the same answer in every worker)."""
        canary = self.canary
        return canary is not None and takes_canary(request_id, canary.version, self.canary_share)

    def min_confidence(self, canary: bool, setting: float) -> float:
        """The confidence a reply needs to carry an opinion: `setting`, or never for the
        version in service while it defers to the engine's rule."""
        return math.inf if self.service_defers and not canary else setting


class Reloader:
    """Keeps `serving` at what `<ns>:serving` names, for one worker or Predictor.

    It reads that state on start, on every reconnect and after every announcement, so a
    missed announcement is caught up with. With a `control`, it also runs the serving step
    when a version is published (a canary starts) and reports a version it cannot load.
    """

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        worker: str,
        control: ServingControl | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = settings.keys
        self.worker = worker
        self.control = control
        self.registry = CheckpointRegistry(client, settings.keys)
        # The network is built from this worker's own configuration, never from metadata
        # in Redis: a checkpoint only supplies weights, for exactly this spec.
        self.spec = spec_from_settings(settings)
        self.serving = Serving()
        # Versions that failed verification: refused once, not refetched on every wake-up.
        self.rejected: set[int] = set()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = b"0-0"  # the newest announcement read

    def start(self) -> Reloader:
        """Follow the announcements in a daemon thread; `synced` is set after the first
        look at `latest`. Starting a started reloader does nothing."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._thread = threading.Thread(target=self._follow, name="negcase-reloader", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop following (the thread notices within one block_ms)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def live(self) -> LoadedModel | None:
        """The model in service (None before the first load)."""
        return self.serving.service

    def sync(self, step: bool = False) -> None:
        """Load what `<ns>:serving` names and swap it in: the version in service (a refused
        one leaves the model in use), and the canary (a refused one answers nothing). With
        `step` and a control, run the serving step first."""
        if step and self.control is not None:
            self.control.step()
        state = read_state(self.client, self.keys)
        current = self.serving
        service = current.service
        if state.service is not None:
            service = self._model(state.service, "service") or service
        canary = None
        if state.canary is not None and state.canary != state.service:
            canary = self._model(state.canary, "canary")
        # A worker still on an older version (the new one failed to load) never defers it.
        defers = state.service_defers and service is not None and service.version == state.service
        updated = Serving(service, canary, state.canary_share, state.epoch, defers)
        if updated != current:
            self.serving = updated

    def _model(self, version: int, role: str) -> LoadedModel | None:
        """The model of `version`: one in use already, else freshly loaded (None when it
        was refused, now or before)."""
        for loaded in (self.serving.service, self.serving.canary):
            if loaded is not None and loaded.version == version:
                return loaded
        if version in self.rejected:
            return None
        return self._load(version, role)

    def load(self, version: int) -> LoadedModel | None:
        """Fetch, verify and load `version` beside the models in use, then swap it in as the
        one in service; on failure, announce checkpoint_rejected and keep serving."""
        loaded = self._load(version, "service")
        if loaded is not None:
            current = self.serving
            self.serving = Serving(loaded, current.canary, current.canary_share, current.epoch)
            # (an explicit load is not the serving state's choice: it never defers)
        return loaded

    def _load(self, version: int, role: str) -> LoadedModel | None:
        """Fetch and verify `version` into a fresh model; on failure, announce
        checkpoint_rejected (and report it to the serving step) and return None. Only a lost
        or stalled Redis connection is raised (the caller reconnects and tries again):
        anything else that goes wrong with a checkpoint is that checkpoint's fault, and
        retrying it would fail the same way forever."""
        started_s = time.perf_counter()
        previous = self.serving.service
        try:
            loaded = self._verified(version)
        except redis.RedisError:
            # Lost, stalled or busy (BUSY, MASTERDOWN, TRYAGAIN): Redis's trouble, not the
            # checkpoint's; the caller backs off and tries again.
            raise
        except Exception as error:
            reason = (
                error.reason if isinstance(error, CheckpointError) else f"v{version}: {error!r}"
            )
            self.rejected.add(version)
            log.warning(f"{self.worker} refused v{version}, serving {_label(previous)}: {reason}")
            self._announce(
                events.checkpoint_rejected(
                    self.worker, version, _version_of(previous), reason, _now_ms(), role
                )
            )
            # A fault of the checkpoint: it must never serve nor be gone back to. A spec
            # this worker does not share is this worker's configuration, not the checkpoint.
            if self.control is not None and not isinstance(error, SpecMismatch):
                self.control.step(refused=version, reason=reason)
            return None
        reload_ms = (time.perf_counter() - started_s) * 1000
        log.info(
            f"{self.worker} loaded v{version} as {role} in {reload_ms:.1f} ms "
            f"(in service was {_label(previous)})"
        )
        self._announce(
            events.checkpoint_loaded(
                self.worker, version, _version_of(previous), reload_ms, _now_ms(), role
            )
        )
        return loaded

    def _verified(self, version: int) -> LoadedModel:
        try:
            stored = self.registry.fetch(version)
        except ValueError as error:  # meta that is not JSON
            raise CheckpointError(f"v{version}: meta unreadable ({error})") from None
        if stored is None:
            raise CheckpointError(f"v{version}: not stored in Redis")
        return verified_model(stored, self.spec, self.settings.feature_count)

    def _follow(self) -> None:
        loop = WorkerLoop(
            f"reloader {self.worker}",
            self._stop,
            on_connect=self._catch_up,
            # Anything else (a `latest` that is not a number, say) must not end the thread:
            # a dead reloader would serve one model forever without a word.
            survive_errors=True,
        )
        loop.run(self._follow_step)

    def _catch_up(self) -> None:
        """On start and reconnect: note the stream position, then load what serving names.
        Reading the state after noting the position means an announcement that lands in
        between is read by the next step, so nothing is missed."""
        self._last_id = self._last_announcement_id()
        self.sync(step=True)
        self.synced.set()

    def _follow_step(self) -> bool:
        """Wait for announcements; a burst of them needs one sync, to whatever serving names
        now (after a serving step when a version was published). Returns whether there
        were any."""
        reply = self.client.xread(
            {self.keys.checkpoints: self._last_id}, block=self.settings.block_ms, count=100
        )
        entries = entries_of(reply)
        if not entries:
            return False
        self._last_id = entries[-1][0]
        published = any(fields.get(b"kind") == b"published" for _, fields in entries)
        self.sync(step=published)
        return True

    def _last_announcement_id(self) -> bytes:
        newest = self.client.xrevrange(self.keys.checkpoints, count=1)
        return newest[0][0] if newest else b"0-0"

    def _announce(self, event: Event) -> None:
        self.client.xadd(
            self.keys.events,
            event.to_fields(),
            maxlen=self.settings.events_maxlen,
            approximate=True,
        )


def _version_of(loaded: LoadedModel | None) -> int | None:
    return None if loaded is None else loaded.version


def _now_ms() -> int:
    return int(time.time() * 1000)


def verified_model(stored: StoredCheckpoint, spec: ModelSpec, feature_count: int) -> LoadedModel:
    """The checkpoint's weights in a model built from `spec` (never from the checkpoint's
    metadata), in eval mode, after every check a hot reload makes; CheckpointError names the
    check that failed."""
    _check_spec(stored.version, stored.meta, spec)
    model = build_model(spec)
    load_verified(stored, model, feature_count)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(stored.version, model)


def load_version(
    registry: CheckpointRegistry, version: int, spec: ModelSpec, feature_count: int
) -> LoadedModel:
    """One given version, from Redis or, when Redis no longer keeps it, from the registry's
    archive, verified exactly as a hot reload is. CheckpointError says why it cannot be
    loaded; only Redis's own trouble is raised as is."""
    try:
        stored = registry.fetch_anywhere(version)
        return verified_model(stored, spec, feature_count)
    except (CheckpointError, redis.RedisError):
        raise
    except CheckpointMissing:
        where = "Redis or the archive's models/" if registry.files else "Redis (no archive)"
        raise CheckpointError(f"v{version}: not in {where}") from None
    except ValueError as error:  # meta that is not JSON
        raise CheckpointError(f"v{version}: meta unreadable ({error})") from None
    except Exception as error:  # a model factory that fails, say: the checkpoint cannot load
        raise CheckpointError(f"v{version}: {error!r}") from None


class SpecMismatch(CheckpointError):
    """A checkpoint trained for another network than this worker's: the worker's settings
    or the trainer's differ, which is no fault of the weights."""


def _check_spec(version: int, meta: object, spec: ModelSpec) -> None:
    """CheckpointError unless the checkpoint was trained for exactly `spec`. Checked before
    any model is built: metadata from Redis never decides the network's shape (a hidden
    size of 100,000 would allocate tens of GB) nor which factory is imported."""
    try:
        theirs = ModelSpec.from_dict(meta["model_spec"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"v{version}: meta.model_spec unusable ({error!r})") from None
    if theirs != spec:
        raise SpecMismatch(
            f"v{version}: model_spec {theirs.to_dict()} is not this worker's {spec.to_dict()} "
            "(give serve the same NEGCASE_MODEL_FACTORY / --model, NEGCASE_HIDDEN_SIZES and "
            "NEGCASE_FEATURE_COUNT as train)"
        )


def _label(loaded: LoadedModel | None) -> str:
    return "no model" if loaded is None else f"v{loaded.version}"


def configure_torch_for_serving() -> None:
    """One intra-op thread: batches are small, and workers scale by process, not thread."""
    torch.set_num_threads(1)
