"""How the model learns, pure torch: a warm start on the outcomes so far, intensive sessions
on prioritized cases beside a replay of recent outcomes with a pull toward the parent, and
the trading gate that judges a candidate against its parent by what its policy would have
earned. The trainer (processes/trainer.py) drives these steps; the outcomes come from store/
(store/outcomes.py) and publishing is processes/publishing.py. Nothing here touches Redis.

The design follows what works for learning from mistakes without forgetting:
- prioritized experience replay (Schaul et al., 2016): the worst mistakes get the most
  training (epochs by priority), but always beside a replay of recent outcomes;
- online hard example mining: losses and missed opportunities are the cases, wins and
  right skips are context the replay draws from, so training sees what was right too;
- continual learning: replay in every step keeps one case, however intensive its training,
  from flipping the whole policy, and an L2 pull toward the parent's weights (a plain form
  of EWC, Kirkpatrick et al., 2017) keeps one session from moving the model far (see the
  settings);
- counterfactual evaluation: every outcome carries the market's move, so the P&L of any
  action on it is known, and the gate compares policies exactly, on the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from negcase.schemas.case import ACTIONS, NegativeCase
from negcase.schemas.outcome import Outcome

CHECK_EVERY_EPOCHS = 10
MIN_PROGRESS = 1e-3  # relative drop of the replay loss that counts as still improving
CASE_WEIGHT = 0.3  # share of each step's loss given to the cases; the replay batch gets the rest
REPLAY_BATCH = 64  # a fresh replay draw each epoch: many epochs see many outcomes, not 64 again
# Smoothed labels keep the model's confidence finite and honest on noisy markets.
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-2
# Recency: the newest outcome is drawn this many times as often as the oldest kept one.
RECENCY_RATIO = 5.0
WARM_START_LR = 1e-3
WARM_START_BATCH = 256


class TrainingInterrupted(Exception):
    """Training stopped before its end: the worker is shutting down or lost its lease."""


@dataclass(frozen=True, slots=True)
class Examples:
    """Features (n, feature_count) float32 and labels (n,) action indices."""

    features: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, cases: Sequence[NegativeCase], feature_count: int) -> Examples:
        """The examples of cases that carry features (callers check them with case_problem)."""
        return cls.of_rows([(case.features, case.label) for case in cases], feature_count)

    @classmethod
    def of_outcomes(cls, outcomes: Sequence[Outcome], feature_count: int) -> Examples:
        """The examples of outcomes (their features and hindsight labels)."""
        return cls.of_rows([(o.features, o.label_index) for o in outcomes], feature_count)

    @classmethod
    def of_rows(cls, rows: Sequence[tuple[Sequence[float], int]], feature_count: int) -> Examples:
        """Examples from (features, label index) pairs."""
        if not rows:
            return cls(torch.zeros(0, feature_count), torch.zeros(0, dtype=torch.long))
        return cls(
            torch.tensor([features for features, _ in rows], dtype=torch.float32),
            torch.tensor([label for _, label in rows], dtype=torch.long),
        )

    def plus(self, other: Examples) -> Examples:
        """These examples followed by `other`'s."""
        return Examples(
            torch.cat([self.features, other.features]), torch.cat([self.labels, other.labels])
        )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, slots=True)
class TradingResult:
    """What a policy would have done on a window of decisions, judged by the market."""

    decisions: int
    trades: int
    losses: int
    mean_pnl_pct: float

    @property
    def loss_rate(self) -> float | None:
        """Losing trades over trades; None when the policy traded nothing."""
        return self.losses / self.trades if self.trades else None

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain data for sessions and checkpoint metadata."""
        rate = self.loss_rate
        return {
            "decisions": self.decisions,
            "trades": self.trades,
            "losses": self.losses,
            "loss_rate": None if rate is None else round(rate, 6),
            "mean_pnl_pct": round(self.mean_pnl_pct, 6),
        }


def trading_result(model: nn.Module, window: Sequence[Outcome]) -> TradingResult | None:
    """The counterfactual trading result of the model's policy on `window`, or None when the
    window is empty. A model whose output is not finite earns -inf: it can never win a gate."""
    if not window:
        return None
    features = torch.tensor([o.features for o in window], dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(features)
    if not torch.isfinite(logits).all():
        return TradingResult(len(window), 0, 0, -math.inf)
    actions = [ACTIONS[i] for i in logits.argmax(dim=1).tolist()]
    pnls = [o.pnl_if(a) for o, a in zip(window, actions, strict=True)]
    traded = [p for a, p in zip(actions, pnls, strict=True) if a != "HOLD"]
    return TradingResult(
        decisions=len(window),
        trades=len(traded),
        losses=sum(1 for p in traded if p < 0),
        mean_pnl_pct=sum(pnls) / len(pnls),
    )


def gate_reason(parent: TradingResult | None, candidate: TradingResult | None) -> str | None:
    """Why the gate refuses a candidate, or None when it may be published. The candidate must
    earn at least its parent's mean P&L per decision on the same window, and at equal P&L
    must not lose more often: no tolerance, so no loss on the window compounds from version
    to version (off it, moves the window cannot see can: hence the pull toward the parent).
    Without a window (or a parent) there is nothing to judge against."""
    if candidate is not None and not math.isfinite(candidate.mean_pnl_pct):
        return "the candidate's output is not finite"
    if parent is None or candidate is None:
        return None
    if candidate.mean_pnl_pct < parent.mean_pnl_pct - 1e-12:
        return (
            f"mean P&L per decision fell from {parent.mean_pnl_pct:+.4f} % to "
            f"{candidate.mean_pnl_pct:+.4f} % on the {candidate.decisions}-decision "
            "validation window"
        )
    worse_rate = (candidate.loss_rate or 0.0) > (parent.loss_rate or 0.0)
    if candidate.mean_pnl_pct <= parent.mean_pnl_pct + 1e-12 and worse_rate:
        return (
            f"same mean P&L per decision, loss rate rose from {parent.loss_rate or 0:.1%} to "
            f"{candidate.loss_rate or 0:.1%} on the {candidate.decisions}-decision window"
        )
    return None


def recency_weights(n: int) -> torch.Tensor:
    """Draw weights for n outcomes, oldest first: linear from 1 to RECENCY_RATIO."""
    if n <= 1:
        return torch.ones(n)
    return torch.linspace(1.0, RECENCY_RATIO, n)


def train_on_cases(
    model: nn.Module,
    cases: Examples,
    replay: Examples,
    epochs: int,
    learning_rate: float,
    anchor_weight: float,
    patience: int,
    should_stop: Callable[[], bool],
    generator: torch.Generator,
) -> tuple[int, bool]:
    """An intensive session: up to `epochs` steps on the cases beside a fresh, recency-
    weighted replay batch each step, with an L2 pull toward the weights the model started
    from. Stops early once every case is predicted right and the replay loss has not improved
    for `patience` checks. Returns (epochs done, stopped early); raises TrainingInterrupted
    when `should_stop` says so."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    n_cases = len(cases)
    # Every epoch's replay batch drawn at once: one call instead of one per step.
    draws = None
    if len(replay):
        weights = recency_weights(len(replay))
        draws = torch.multinomial(
            weights, REPLAY_BATCH * epochs, replacement=True, generator=generator
        ).view(epochs, REPLAY_BATCH)
    # fused: one kernel for the whole update, a fifth faster per step on CPU for small models
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=WEIGHT_DECAY, fused=True)
    best, stale = math.inf, 0
    model.train()
    for epoch in range(1, epochs + 1):
        # forward: the cases and this epoch's replay batch, in one pass
        features, labels = cases.features, cases.labels
        if draws is not None:
            drawn = draws[epoch - 1]
            features = torch.cat([features, replay.features[drawn]])
            labels = torch.cat([labels, replay.labels[drawn]])
        per_example = F.cross_entropy(
            model(features), labels, reduction="none", label_smoothing=LABEL_SMOOTHING
        )
        loss = case_loss = per_example[:n_cases].mean()
        replay_loss = None
        if draws is not None:
            replay_loss = per_example[n_cases:].mean()
            loss = CASE_WEIGHT * case_loss + (1 - CASE_WEIGHT) * replay_loss
        # backprop, the pull toward the parent (the gradient of anchor_weight * |p - a|^2,
        # added straight to the gradients), and update
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if anchor_weight:
            with torch.no_grad():
                for p, a in zip(params, anchor, strict=True):
                    p.grad.add_(p - a, alpha=2 * anchor_weight)
        optimizer.step()
        if epoch % CHECK_EVERY_EPOCHS:
            continue
        if should_stop():
            raise TrainingInterrupted(f"stopped after {epoch} epochs")
        if not math.isfinite(loss.item()):
            return epoch, True  # diverged: the weights are not finite, and never published
        watched = (case_loss if replay_loss is None else replay_loss).item()
        if watched < best * (1 - MIN_PROGRESS):
            best, stale = watched, 0
        else:
            stale += 1
        if patience and stale >= patience and _all_right(model, cases):
            return epoch, True
    return epochs, False


def fit_history(
    model: nn.Module,
    history: Examples,
    epochs: int,
    should_stop: Callable[[], bool],
    generator: torch.Generator,
) -> int:
    """A warm start: plain supervised learning on every outcome so far (minibatches, a few
    passes), so that the first checkpoint is a model of the market, not of one case."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=WARM_START_LR, weight_decay=WEIGHT_DECAY, fused=True
    )
    model.train()
    n = len(history)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, WARM_START_BATCH):
            batch = order[start : start + WARM_START_BATCH]
            logits = model(history.features[batch])
            loss = F.cross_entropy(logits, history.labels[batch], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch % CHECK_EVERY_EPOCHS == 0 and should_stop():
            raise TrainingInterrupted(f"stopped after {epoch} warm-start epochs")
    return epochs


def _all_right(model: nn.Module, cases: Examples) -> bool:
    with torch.no_grad():
        return bool((model(cases.features).argmax(dim=1) == cases.labels).all())


@dataclass(frozen=True, slots=True)
class Measurement:
    """Mean cross-entropy and accuracy of a model on some examples; `nonfinite` examples,
    whose logits hold NaN or infinity, count as wrong and are left out of the mean loss."""

    loss: float
    accuracy: float
    nonfinite: int = 0

    def to_dict(self) -> dict[str, float]:
        """Plain data for metrics."""
        return {
            "loss": round(self.loss, 6),
            "accuracy": round(self.accuracy, 6),
            "nonfinite": self.nonfinite,
        }


def measure(model: nn.Module, examples: Examples) -> Measurement | None:
    """Loss and accuracy of `model` on `examples`, or None when there are none."""
    if len(examples) == 0:
        return None
    model.eval()
    with torch.no_grad():
        logits = model(examples.features)
        finite = torch.isfinite(logits).all(dim=1)
        right = (logits.argmax(dim=1) == examples.labels) & finite
        losses = F.cross_entropy(logits[finite], examples.labels[finite], reduction="none")
        loss = losses.mean().item() if len(losses) else math.inf
        accuracy = right.float().mean().item()
    return Measurement(loss, accuracy, int((~finite).sum()))


def improvements(
    before: Measurement | None, after: Measurement | None
) -> tuple[float | None, float | None]:
    """(loss improvement in percent, accuracy improvement in points) on the validation window."""
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
