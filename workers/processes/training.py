"""Intensive training, pure torch: the case mixed with replayed earlier cases, early stopping,
before and after measurements on the held-out set, and the validation gate. The trainer
(processes/trainer.py) drives these steps; the cases come from store/ (store/samples.py) and
publishing is processes/publishing.py. Nothing here touches Redis or the disk."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from negcase.schemas.case import NegativeCase

CHECK_EVERY_EPOCHS = 10
MIN_PROGRESS = 1e-3  # relative drop of the watched loss that counts as still improving
CASE_WEIGHT = 0.5  # share of each step's loss given to the new cases; replay gets the rest
# Hundreds of full-batch steps on a handful of examples drive logits to infinity; smoothed
# labels and weight decay keep the model's confidence finite, so it still generalizes.
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-3


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
        loss = case_loss
        if replay_loss is not None:
            loss = CASE_WEIGHT * case_loss + (1 - CASE_WEIGHT) * replay_loss
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


@dataclass(frozen=True, slots=True)
class Update:
    """A trained model as a change: the version it started from, and its weights before/after."""

    base_version: int | None
    base_state: dict[str, torch.Tensor]
    trained_state: dict[str, torch.Tensor]


def measure_state(
    scratch: nn.Module, state: dict[str, torch.Tensor], examples: Examples
) -> Measurement | None:
    """Loss and accuracy of weights `state`, loaded into `scratch` to measure them."""
    scratch.load_state_dict(state)
    return measure(scratch, examples)


def measurement_dict(measurement: Measurement | None) -> dict[str, float] | None:
    """A measurement as plain data, or None."""
    return None if measurement is None else measurement.to_dict()
