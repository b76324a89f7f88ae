"""Intensive training: the case mixed with replayed earlier cases, early stopping, before and
after measurements on a deterministic held-out set, the validation gate, and publishing with
rebase. The trainer (workers/trainer.py) drives these steps; nothing here loops on Redis."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
import torch.nn.functional as F
from torch import nn

from negcase.processes.model import rebased, sha256_hex, verified_state, weights_bytes
from negcase.schemas.case import NegativeCase
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry, PublishConflict
from negcase.store.keys import Keys
from negcase.store.queue import Lease, id_hash, is_held_out

CHECK_EVERY_EPOCHS = 10
MIN_PROGRESS = 1e-3  # relative drop of the watched loss that counts as still improving
CASE_WEIGHT = 0.5  # share of each step's loss given to the new cases; replay gets the rest
# Hundreds of full-batch steps on a handful of examples drive logits to infinity; smoothed
# labels and weight decay keep the model's confidence finite, so it still generalizes.
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-3
MAX_PUBLISH_TRIES = 10


class TrainingInterrupted(Exception):
    """Training stopped before its end: the worker is shutting down or lost its lease."""


@dataclass(frozen=True, slots=True)
class Examples:
    """Cases as tensors: features (n, feature_count) float32 and labels (n,) action indices."""

    features: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, cases: Sequence[NegativeCase], feature_count: int) -> Examples:
        """The examples of cases that carry features (callers check them with case_problem)."""
        if not cases:
            return cls(torch.zeros(0, feature_count), torch.zeros(0, dtype=torch.long))
        return cls(
            torch.tensor([case.features for case in cases], dtype=torch.float32),
            torch.tensor([case.label for case in cases], dtype=torch.long),
        )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, slots=True)
class Measurement:
    """Mean cross-entropy and accuracy of a model on some examples."""

    loss: float
    accuracy: float

    def to_dict(self) -> dict[str, float]:
        """Plain data for metrics."""
        return {"loss": round(self.loss, 6), "accuracy": round(self.accuracy, 6)}


def case_problem(case: NegativeCase, feature_count: int) -> str | None:
    """Why a case cannot be trained on, or None when it can."""
    features = case.features
    if features is None or len(features) != feature_count:
        found = "none" if features is None else len(features)
        return f"features: expected {feature_count} numbers, got {found}"
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in features):
        return "features: not all finite numbers"
    if case.what_should_have_been_done not in ("BUY", "SELL", "HOLD"):
        return f"label: unknown action {case.what_should_have_been_done!r}"
    return None


def measure(model: nn.Module, examples: Examples) -> Measurement | None:
    """Loss and accuracy of `model` on `examples`, or None when there are none."""
    if len(examples) == 0:
        return None
    model.eval()
    with torch.no_grad():
        logits = model(examples.features)
        loss = F.cross_entropy(logits, examples.labels).item()
        accuracy = (logits.argmax(dim=1) == examples.labels).float().mean().item()
    return Measurement(loss, accuracy)


def train_intensively(
    model: nn.Module,
    cases: Examples,
    replay: Examples,
    epochs: int,
    learning_rate: float,
    patience: int,
    should_stop: Callable[[], bool],
) -> tuple[int, bool]:
    """Train on the cases mixed with the replay sample for up to `epochs` full-batch steps.
    Stops early once every case is predicted right and the watched loss (replay, or the
    cases' without replay) has not improved for `patience` checks. Returns (epochs done,
    stopped early); raises TrainingInterrupted when `should_stop` says so."""
    features = torch.cat([cases.features, replay.features])
    labels = torch.cat([cases.labels, replay.labels])
    n_cases = len(cases)
    # fused: one kernel for the whole update, a fifth faster per step on CPU for small models
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY, fused=True
    )
    best, stale = math.inf, 0
    model.train()
    for epoch in range(1, epochs + 1):
        # forward: half the weight on the new cases, half on remembering the old ones
        per_example = F.cross_entropy(
            model(features), labels, reduction="none", label_smoothing=LABEL_SMOOTHING
        )
        case_loss = per_example[:n_cases].mean()
        replay_loss = per_example[n_cases:].mean() if len(replay) else None
        loss = case_loss if replay_loss is None else (
            CASE_WEIGHT * case_loss + (1 - CASE_WEIGHT) * replay_loss
        )  # fmt: skip
        # backprop and update
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if epoch % CHECK_EVERY_EPOCHS:
            continue
        if should_stop():
            raise TrainingInterrupted(f"stopped after {epoch} epochs")
        watched = (case_loss if replay_loss is None else replay_loss).item()
        if watched < best * (1 - MIN_PROGRESS):
            best, stale = watched, 0
        else:
            stale += 1
        if patience and stale >= patience and _all_right(model, cases):
            return epoch, True
    return epochs, False


def _all_right(model: nn.Module, cases: Examples) -> bool:
    with torch.no_grad():
        return bool((model(cases.features).argmax(dim=1) == cases.labels).all())


def gate_reason(
    before: Measurement | None, after: Measurement | None, tolerance: float
) -> str | None:
    """Why the validation gate refuses an update (held-out loss worse than its parent's by
    more than `tolerance`, relative), or None when it may be published."""
    if before is None or after is None:
        return None
    if after.loss > before.loss * (1 + tolerance) + 1e-9:
        return (
            f"held-out loss rose from {before.loss:.4f} to {after.loss:.4f} "
            f"(tolerance {tolerance:.1%}); held-out accuracy "
            f"{before.accuracy:.1%} -> {after.accuracy:.1%}"
        )
    return None


def improvements(
    before: Measurement | None, after: Measurement | None
) -> tuple[float | None, float | None]:
    """(loss improvement in percent, accuracy improvement in points) on the held-out set."""
    if before is None or after is None:
        return None, None
    loss = (before.loss - after.loss) / before.loss * 100 if before.loss > 0 else 0.0
    return round(loss, 4), round((after.accuracy - before.accuracy) * 100, 4)


class HeldOutSet:
    """The held-out cases: those the fixed rule on the id holds out (about `share` of all
    cases, store/queue.py is_held_out), trainable, at most `size` of them (lowest id hashes
    first), the same for every trainer. They are never claimed for training and never
    replayed, so they measure generalization. Re-read when the case count grew by 10 % or
    the set is not full yet."""

    def __init__(
        self, client: redis.Redis, keys: Keys, size: int, feature_count: int, share: float
    ) -> None:
        self.client = client
        self.keys = keys
        self.size = size
        self.feature_count = feature_count
        self.share = share
        self._total = -1
        self._cases: list[NegativeCase] = []

    def cases(self) -> list[NegativeCase]:
        """The held-out cases, refreshed when the case population grew enough."""
        if self.size <= 0 or self.share <= 0:
            return []
        total = int(self.client.scard(self.keys.cases))
        full = len(self._cases) >= self.size
        if total != self._total and (not full or total >= self._total * 1.1):
            ids = (i.decode() for i in self.client.smembers(self.keys.cases))
            held = sorted((i for i in ids if is_held_out(i, self.share)), key=id_hash)
            chosen = CaseStore(self.client, self.keys).get_many(held[: self.size])
            self._cases = [c for c in chosen if case_problem(c, self.feature_count) is None]
            self._total = total
        return self._cases

    def ids(self) -> set[str]:
        """Ids of the current held-out cases."""
        return {case.case_id for case in self._cases}


def sample_replay(
    client: redis.Redis,
    keys: Keys,
    size: int,
    exclude: set[str],
    feature_count: int,
    rng: random.Random,
    heldout_share: float,
) -> list[NegativeCase]:
    """Up to `size` earlier cases, drawn at random with weight = priority, from those done
    that were trained and not refused by the gate: never a held-out case (it would stop
    being held out) nor a rejected one (its update was judged harmful)."""
    if size <= 0:
        return []
    drawn = [i.decode() for i in client.srandmember(keys.done, 3 * size) or []]
    candidates = [i for i in drawn if i not in exclude and not is_held_out(i, heldout_share)]
    if not candidates:
        return []
    refused = client.hmget(keys.rejected, candidates)
    accepted = [i for i, reason in zip(candidates, refused, strict=True) if reason is None]
    cases = CaseStore(client, keys).get_many(accepted)
    usable = [case for case in cases if case_problem(case, feature_count) is None]
    # Weighted sampling without replacement (Efraimidis-Spirakis): key u^(1/w), largest win.
    ranked = sorted(usable, key=lambda c: rng.random() ** (1 / c.training_priority), reverse=True)
    return ranked[:size]


@dataclass(frozen=True, slots=True)
class Update:
    """A trained model as a change: the version it started from, and its weights before/after."""

    base_version: int | None
    base_state: dict[str, torch.Tensor]
    trained_state: dict[str, torch.Tensor]


@dataclass(slots=True)
class PublishResult:
    """What became of an update: published as `version`, or refused with `rejected_reason`."""

    version: int | None = None
    parent_version: int | None = None
    rejected_reason: str | None = None
    rebases: int = 0
    heldout_before: Measurement | None = None
    heldout_after: Measurement | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def publish_update(
    registry: CheckpointRegistry,
    update: Update,
    scratch: nn.Module,
    feature_count: int,
    heldout: Examples,
    tolerance: float,
    meta: dict[str, Any],
    leases: Sequence[Lease] = (),
    trainer: str = "",
) -> PublishResult:
    """Gate and publish an update on top of whatever is latest now. When another trainer
    published since `update.base_version`, the update is rebased (latest + trained - base)
    and gated again against latest. `scratch` is a model of the right shape to measure with.
    Raises LeaseLost when a lease is no longer held."""
    result = PublishResult()
    with registry.publish_lock():
        for _ in range(MAX_PUBLISH_TRIES):
            parent = registry.fetch_latest()
            if parent is None or parent.version == update.base_version:
                parent_state, candidate = update.base_state, update.trained_state
            else:
                parent_state = verified_state(parent, scratch, feature_count)
                candidate = rebased(parent_state, update.trained_state, update.base_state)
                result.rebases += 1
            parent_version = None if parent is None else parent.version
            result.parent_version = parent_version
            result.heldout_before = _measure_state(scratch, parent_state, heldout)
            result.heldout_after = _measure_state(scratch, candidate, heldout)
            result.rejected_reason = gate_reason(
                result.heldout_before, result.heldout_after, tolerance
            )
            if result.rejected_reason:
                return result
            weights = weights_bytes(candidate)
            metrics = {
                **meta.get("metrics", {}),
                "heldout_before": measurement_dict(result.heldout_before),
                "heldout_after": measurement_dict(result.heldout_after),
                "rebases": result.rebases,
            }
            result.meta = {**meta, "metrics": metrics, "trainer": trainer}
            try:
                result.version = registry.publish(
                    weights, sha256_hex(weights), result.meta, parent_version, leases, trainer
                )
                return result
            except PublishConflict:
                continue  # a rollback or an expired lock: rebase on the new latest
    raise RuntimeError(f"latest kept moving: gave up after {MAX_PUBLISH_TRIES} tries")


def _measure_state(
    scratch: nn.Module, state: dict[str, torch.Tensor], examples: Examples
) -> Measurement | None:
    scratch.load_state_dict(state)
    return measure(scratch, examples)


def measurement_dict(measurement: Measurement | None) -> dict[str, float] | None:
    """A measurement as plain data, or None."""
    return None if measurement is None else measurement.to_dict()
