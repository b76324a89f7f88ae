"""A first model from history: the trainers' warm start, on outcomes read from a file
(`negcase bootstrap`), gated on the held-out ones and published like any session's."""

from __future__ import annotations

import random

import torch

from negcase.processes.model import build_model, spec_from_settings, state_of
from negcase.processes.publishing import PublishResult, publish_update
from negcase.processes.training import Examples, Update, fit_history
from negcase.runtime.settings import Settings
from negcase.schemas.outcome import Outcome
from negcase.store.checkpoints import CheckpointRegistry


def bootstrap_model(
    registry: CheckpointRegistry,
    settings: Settings,
    history: list[Outcome],
    window: list[Outcome],
) -> PublishResult:
    """The warm start on `history`, gated on `window` and published; the PublishResult."""
    spec = spec_from_settings(settings)
    torch.manual_seed(settings.seed)
    model = build_model(spec)
    initial = state_of(model)
    generator = torch.Generator().manual_seed(random.Random(settings.seed).getrandbits(63))
    examples = Examples.of_outcomes(history, settings.feature_count)
    fit_history(model, examples, settings.warm_start_epochs, lambda: False, generator)
    meta = {
        "feature_count": settings.feature_count,
        "model_spec": spec.to_dict(),
        "case_ids": [],
        "metrics": {"bootstrap_outcomes": len(history), "warm_start": True},
    }
    update = Update(None, initial, state_of(model))
    return publish_update(
        registry, update, build_model(spec), settings.feature_count, window, meta, (), "bootstrap"
    )
