"""Helpers for the inference tests: publish real checkpoints, write bad ones, read events."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import numpy as np
import orjson
import redis
import torch
from torch import nn

from negcase.client.signal_client import SignalClient
from negcase.processes.model import (
    ModelSpec,
    build_model,
    load_verified,
    sha256_hex,
    spec_from_settings,
    state_of,
    weights_bytes,
)
from negcase.runtime.settings import Settings
from negcase.schemas.event import Event
from negcase.schemas.signal import Signal
from negcase.store.checkpoints import CheckpointRegistry, PublishConflict
from negcase.store.live import LiveOutcome, LiveScores
from negcase.store.serving import ServingControl

FEATURES = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8]
BAD_KINDS = (
    "corrupted",
    "wrong_sha256",
    "wrong_shape",
    "nan_weights",
    "not_safetensors",
    "negative_hidden_size",
)


def small_mlp(feature_count: int, n_actions: int) -> nn.Module:
    """A user model factory, as `--model tests.serving:small_mlp` names it."""
    return nn.Sequential(nn.Linear(feature_count, 16), nn.Tanh(), nn.Linear(16, n_actions))


def broken_factory(feature_count: int, n_actions: int) -> nn.Module:
    """A user model factory with a bug: building the model always fails."""
    raise RuntimeError(f"factory bug ({feature_count} features, {n_actions} actions)")


def seeded_model(settings: Settings, seed: int) -> nn.Module:
    """A model with weights drawn from `seed`: each seed is a different model."""
    torch.manual_seed(seed)
    return build_model(spec_from_settings(settings))


def checkpoint_meta(settings: Settings, spec: ModelSpec | None = None) -> dict:
    """The meta a trainer publishes with, as far as inference reads it."""
    spec = spec or spec_from_settings(settings)
    return {"feature_count": settings.feature_count, "model_spec": spec.to_dict(), "trainer": "t"}


def publish(client: redis.Redis, settings: Settings, seed: int) -> int:
    """Publish a seeded model through the training engineer's registry; its version."""
    registry = CheckpointRegistry(client, settings.keys)
    weights = weights_bytes(state_of(seeded_model(settings, seed)))
    # As a trainer does: when latest moved meanwhile (a serving step retired a refused
    # canary and pointed latest back), publish on top of the new latest.
    for _ in range(5):
        try:
            return registry.publish(
                weights, sha256_hex(weights), checkpoint_meta(settings), registry.latest_version()
            )
        except PublishConflict:
            continue
    raise AssertionError("latest kept moving")


def stored_model(client: redis.Redis, settings: Settings, version: int) -> nn.Module:
    """The model of a stored version, loaded locally: what a worker should answer with."""
    stored = CheckpointRegistry(client, settings.keys).fetch(version)
    assert stored is not None
    model = build_model(spec_from_settings(settings))
    load_verified(stored, model, settings.feature_count)
    return model.eval()


def local_probabilities(model: nn.Module, features: list[float]) -> list[float]:
    """Softmax of one local forward pass, in ACTIONS order."""
    with torch.inference_mode():
        logits = model(torch.tensor([features], dtype=torch.float32))
        return torch.softmax(logits, dim=1)[0].tolist()


def write_checkpoint(
    client: redis.Redis, settings: Settings, weights: bytes, meta: dict, sha256: str | None = None
) -> int:
    """Store a checkpoint as given, move latest to it and announce it, as a broken trainer
    (or a person with redis-cli) would; its version."""
    keys = settings.keys
    sha256 = sha256 or sha256_hex(weights)
    version = int(client.incr(keys.version_counter))
    client.hset(
        keys.checkpoint(version),
        mapping={"weights": weights, "sha256": sha256, "meta": orjson.dumps(meta)},
    )
    client.set(keys.latest, version)
    client.xadd(keys.checkpoints, {"kind": "published", "version": version, "sha256": sha256})
    return version


def write_bad_checkpoint(client: redis.Redis, settings: Settings, kind: str) -> int:
    """Store and announce a checkpoint that must be refused (one of BAD_KINDS); its version."""
    weights, meta = weights_bytes(state_of(seeded_model(settings, 99))), checkpoint_meta(settings)
    sha256 = sha256_hex(weights)
    if kind == "corrupted":
        # Garble the safetensors header but store the matching sha256: only parsing can tell.
        weights = b"\xff" * 16 + weights[16:]
        sha256 = sha256_hex(weights)
    elif kind == "wrong_sha256":
        sha256 = sha256_hex(b"something else")
    elif kind == "wrong_shape":
        weights = weights_bytes(state_of(build_model(ModelSpec(settings.feature_count, (32,)))))
        sha256 = sha256_hex(weights)
    elif kind == "nan_weights":
        state = state_of(seeded_model(settings, 99))
        next(iter(state.values()))[0, 0] = float("nan")
        weights = weights_bytes(state)
        sha256 = sha256_hex(weights)
    elif kind == "not_safetensors":
        buffer = io.BytesIO()
        torch.save(state_of(seeded_model(settings, 99)), buffer)  # pickle: never loaded
        weights = buffer.getvalue()
        sha256 = sha256_hex(weights)
    elif kind == "negative_hidden_size":
        # Metadata that would decide the network's shape, if a worker let it.
        meta["model_spec"]["hidden_sizes"] = [-1]
    else:
        raise ValueError(kind)
    return write_checkpoint(client, settings, weights, meta, sha256)


def events_of(client: redis.Redis, settings: Settings, kind: str) -> list[Event]:
    """Every event of one type on `<ns>:events`, oldest first."""
    events = (Event.from_fields(f) for _, f in client.xrange(settings.keys.events))
    return [event for event in events if event.type == kind]


@dataclass
class Load:
    """Requests sent in a loop from threads of their own, with every reply and failure."""

    settings: Settings
    threads: int = 2
    signals: list[Signal] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for n in range(self.threads):
            thread = threading.Thread(target=self._send, args=(n,), daemon=True)
            thread.start()
            self._running.append(thread)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._running:
            thread.join(30)
            if thread.is_alive():
                self.failures.append(f"{thread.name} still sending 30 s after the load ended")

    def _send(self, n: int) -> None:
        # A socket timeout of its own (redis-py's default is None before 8.0 and 5 s since):
        # a Redis stalled for seconds by other work on a shared test machine is not a
        # request the workers failed.
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=30)
        signals = SignalClient(client, self.settings.namespace)
        rng = np.random.default_rng(n)
        while not self._stop.is_set():
            try:
                self.signals.append(signals.request(rng.normal(size=8).tolist(), timeout_s=20))
            except Exception as error:  # every kind: one missed here would end the thread
                self.failures.append(repr(error))
        client.close()


def serving_story(client: redis.Redis, settings: Settings) -> tuple[int, int, int]:
    """Every serving decision the live figures make: a fresh version put in service, a canary
    that loses retired, one that earns promoted and then, losing, rolled back, and the
    version in service again deferred to the engine's rule, which earned more on the same
    decisions. Returns (the version in service, the retired one, the one promoted then
    rolled back)."""
    judged = settings.with_overrides(canary_share=0.25, canary_min_outcomes=2, live_window=4)
    steps = ServingControl(client, judged)
    live = LiveScores(client, settings.keys, judged.live_window)
    service = publish(client, settings, seed=49)
    assert ServingControl(client, judged.with_overrides(canary_share=0.0)).step()
    live.record([LiveOutcome(f"story-s{n}", service, pnl) for n, pnl in enumerate((1.0, 2.0))])
    outcomes = {"retired": (-1.0, -2.0), "promoted": (2.0, 3.0)}
    versions = []
    for seed, (change, pnls) in enumerate(outcomes.items(), start=50):
        version = publish(client, settings, seed)
        assert steps.step().kind == "canary_started"
        live.record([LiveOutcome(f"story-{seed}-{n}", version, p) for n, p in enumerate(pnls)])
        assert steps.step().kind == change
        versions.append(version)
    live.record([LiveOutcome(f"story-late-{n}", versions[1], -5.0) for n in range(4)])
    assert steps.step().kind == "rollback"
    # (each decision of the version: its P&L, then the rule's on the same decision)
    against_rule = [LiveOutcome(f"story-rule-{n}", service, p, 1.0) for n, p in enumerate((-1, 0))]
    live.record(against_rule)
    assert steps.step().kind == "deferred"
    return service, versions[0], versions[1]
