"""The backtest's served policy: the live logic carried on over the held-out part.

Nothing of the held-out part is published or trained on; what changes there is which of the
published versions serves. At each held-out decision the version `<ns>:serving` names
answers it (the one in service, or the canary for its share of decisions, chosen by the
decision's id as inference workers choose), used as an engine uses a model: its action where
it has an opinion, the control rule elsewhere (everywhere, while the version in service
defers to the rule). Once the position closes, its result, and the control rule's on the
same bar, join that version's live figures (store/live.py) whoever decided, since the
version's served policy is what is scored; and the serving step, the same script as live,
promotes, retires, rolls back or defers to the rule. So the row judges the live-safety logic
on real bars.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from negcase.processes.model import CheckpointError, spec_from_settings
from negcase.processes.reloader import LoadedModel, load_version
from negcase.runtime.settings import Settings
from negcase.schemas.signal import signal_from_probabilities
from negcase.sim.bars import Bars
from negcase.sim.pipeline import settle
from negcase.sim.trading import Terms, control_side, exit_bar, side_pnl_pct, trade_id
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.live import LiveOutcome, LiveScores
from negcase.store.serving import ServingControl, answering_version, read_state

if TYPE_CHECKING:
    from negcase.sim.backtest import Market


@dataclass(frozen=True, slots=True)
class Served:
    """What the served policy did at each held-out decision: the side, the version that
    answered (None: no checkpoint, the control rule decided), the version in service, and
    every serving change the live logic made, with the bar it came before."""

    sides: tuple[str, ...]
    answered_by: tuple[int | None, ...]
    in_service: tuple[int | None, ...]
    changes: tuple[dict[str, Any], ...]


@dataclass
class ServedPolicy:
    """The live logic over the held-out bars of one backtest namespace."""

    client: redis.Redis
    settings: Settings
    registry: CheckpointRegistry
    bars: Bars
    terms: Terms
    symbol: str
    models: dict[int, LoadedModel | None] = field(default_factory=dict)

    def run(self, held_out: tuple[int, ...], rows: np.ndarray) -> Served:
        """Decide at every held-out bar, in order, feeding each result back as it closes."""
        keys = self.settings.keys
        live = LiveScores(self.client, keys, self.settings.live_window)
        steps = ServingControl(self.client, self.settings)
        closing: deque[tuple[int, LiveOutcome]] = deque()
        sides, answered_by, in_service, changes = [], [], [], []
        for t, row in zip(held_out, rows, strict=True):
            closed = []
            while closing and closing[0][0] < t:
                closed.append(closing.popleft()[1])
            live.record(closed)
            changes += [
                {"before": self.bars.label(t), "change": c.kind, "version": c.version}
                for c in settle(steps)
            ]
            state = read_state(self.client, keys)
            decision_id = trade_id(self.symbol, t)
            version = answering_version(state, decision_id)
            control = control_side(self.bars, t)
            model = None if version is None else self._model(version)
            defers = state.service_defers and version == state.service
            side, by_model = self._side(model, row, control, defers)
            if model is not None:
                # Scored whenever the version answered, as engines report it (with the
                # rule's side): with no opinion, what the rule did is the version's too.
                outcome = LiveOutcome(
                    decision_id, version, self._pnl(t, side), self._pnl(t, control) or 0.0
                )
                closing.append((exit_bar(t, self.terms), outcome))
            sides.append(side)
            answered_by.append(version if by_model else None)
            in_service.append(state.service)
        return Served(tuple(sides), tuple(answered_by), tuple(in_service), tuple(changes))

    def _pnl(self, t: int, side: str) -> float | None:
        return side_pnl_pct(self.bars, t, side, self.terms, self.symbol)

    def _side(
        self, model: LoadedModel | None, row: np.ndarray, control: str, defers: bool
    ) -> tuple[str, bool]:
        """The side the engine takes, and whether the model decided it (never, while the
        version defers to the engine's rule)."""
        if model is None or defers:
            return control, False
        probabilities = model.probabilities(row.astype(np.float32)[None, :])[0].tolist()
        signal = signal_from_probabilities(
            probabilities, model.version, min_confidence=self.settings.min_confidence
        )
        return (signal.action, True) if signal.opinion else (control, False)

    def _model(self, version: int) -> LoadedModel | None:
        """The version's model, loaded once; None when it cannot be loaded (a worker would
        refuse it, and the engine keeps its own rule)."""
        if version not in self.models:
            spec = spec_from_settings(self.settings)
            try:
                loaded = load_version(self.registry, version, spec, self.settings.feature_count)
            except CheckpointError:
                loaded = None
            self.models[version] = loaded
        return self.models[version]


def served_policy(
    client: redis.Redis,
    settings: Settings,
    registry: CheckpointRegistry,
    market: Market,
    rows: np.ndarray,
) -> Served:
    """The served policy over the held-out part of `market` (see the module's docstring)."""
    policy = ServedPolicy(client, settings, registry, market.bars, market.terms, market.symbol)
    return policy.run(market.plan.held_out, rows)
