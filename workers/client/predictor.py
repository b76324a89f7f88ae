"""Predictor: the inference worker's model, embedded in a Python trading engine.

It follows `<ns>:checkpoints` in a background thread exactly as `negcase serve` does (same
verification, same swap), and `predict` runs the live model in the caller's thread with no
Redis round trip. Pinned to a version (`Predictor(client, version=N)`), it loads that one
version, from Redis or from the archive's models/ when Redis no longer keeps it, verified
as a hot reload is, and never moves: for fair comparisons and reproducible answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from negcase.processes.reloader import LoadedModel, Reloader, load_version
from negcase.runtime.settings import DEFAULT_REDIS_URL, Settings
from negcase.schemas.signal import (
    Signal,
    SignalRequestError,
    check_features,
    signal_from_probabilities,
)
from negcase.store.archive import existing_archive
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import (
    Client,
    check_namespace_slot,
    connect,
    require_bytes_replies,
)
from negcase.store.streams import default_consumer_name


class NoModelYet(RuntimeError):
    """No checkpoint has been published (or every one so far was refused)."""


class Predictor:
    """`predict(features) -> Signal` from the verified checkpoint in service (and a canary
    for its share of decisions, when given their ids), or from the one `version` it is
    pinned to.

    Use as a context manager, or call `start()` and `close()`. `client` must return bytes
    (redis-py's default): a client with decode_responses=True is a TypeError here, before it
    could mangle a checkpoint and have it refused in front of every operator.
    """

    def __init__(
        self,
        client: Client,
        settings: Settings | None = None,
        name: str | None = None,
        version: int | None = None,
    ) -> None:
        require_bytes_replies(client, "Predictor")
        self.settings = settings or Settings.from_env()
        check_namespace_slot(client, self.settings.keys)
        self.name = name or f"predictor:{default_consumer_name()}"
        self.reloader = Reloader(client, self.settings, self.name)
        self.pinned_version = version
        self._pinned: LoadedModel | None = None
        self._row = np.empty((1, self.settings.feature_count), np.float32)

    @classmethod
    def from_settings(
        cls, settings: Settings, name: str | None = None, version: int | None = None
    ) -> Predictor:
        """A Predictor on `settings.redis_url` (any form `store.connection` takes: one
        server, Sentinel, Cluster): it follows a failover by itself."""
        return cls(connect(settings.redis_url or DEFAULT_REDIS_URL), settings, name, version)

    def start(self, timeout_s: float = 10.0) -> Predictor:
        """Start following checkpoints and wait up to `timeout_s` for the first look at
        `latest` (a model is loaded then if one was published). Pinned: load the pinned
        version now, or raise CheckpointError saying why it cannot be loaded."""
        if self.pinned_version is not None:
            registry = CheckpointRegistry(
                self.reloader.client, self.settings.keys, existing_archive(self.settings.data_dir)
            )
            self._pinned = load_version(
                registry, self.pinned_version, self.reloader.spec, self.settings.feature_count
            )
            return self
        self.reloader.start()
        self.reloader.synced.wait(timeout_s)
        return self

    def close(self) -> None:
        """Stop following checkpoints."""
        if self.pinned_version is None:
            self.reloader.stop()

    def __enter__(self) -> Predictor:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def version(self) -> int | None:
        """The version `predict` uses now, or None before the first load."""
        live = self._live()
        return None if live is None else live.version

    def _live(self) -> LoadedModel | None:
        return self._pinned if self.pinned_version is not None else self.reloader.live

    def _answering(self, request_id: str | None) -> tuple[LoadedModel | None, bool, float]:
        """The model that answers, whether it is the canary on trial, and the confidence its
        reply needs to carry an opinion (a pinned version is served as it is, the live one
        as inference workers serve it)."""
        setting = self.settings.min_confidence
        if self.pinned_version is not None:
            return self._pinned, False, setting
        serving = self.reloader.serving
        canary = request_id is not None and serving.takes_canary(request_id)
        model = serving.canary if canary else serving.service
        return model, canary, serving.min_confidence(canary, setting)

    def _why_no_model(self) -> str:
        if self.pinned_version is None:
            return "no checkpoint published yet"
        return f"pinned v{self.pinned_version} is not loaded: call start() first"

    def predict(
        self, features: Sequence[float] | np.ndarray, request_id: str | None = None
    ) -> Signal:
        """The signal for one set of features, from the version in service; with a
        `request_id` (the decision's id), a canary answers its share of them as inference
        workers do. SignalRequestError names a bad value, NoModelYet means nothing can answer
        yet. Not safe to call from several threads at once (it reuses one input buffer); use
        one Predictor per thread."""
        live, canary, min_confidence = self._answering(request_id)
        if live is None:
            raise NoModelYet(self._why_no_model())
        row = self._row
        if isinstance(features, np.ndarray):
            _check_array(features, row.shape[1])
        else:
            check_features(features, row.shape[1])
        row[0] = features
        probabilities = live.probabilities(row)[0].tolist()
        return signal_from_probabilities(
            probabilities,
            live.version,
            request_id,
            min_confidence=min_confidence,
            canary=canary,
        )


def _check_array(features: np.ndarray, feature_count: int) -> None:
    if features.shape != (feature_count,):
        raise SignalRequestError(
            "features", f"expected shape ({feature_count},), got {features.shape}"
        )
    if not np.issubdtype(features.dtype, np.number):
        raise SignalRequestError("features", f"expected numbers, got dtype {features.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        finite = np.isfinite(features.astype(np.float32))
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise SignalRequestError(
            f"features[{index}]", f"must be a finite float32 number, got {features[index]!r}"
        )
