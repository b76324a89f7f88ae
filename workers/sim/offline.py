"""The offline model: what a user would build instead of negcase. The same architecture as
the checkpoints, trained once by plain supervised learning on every bar of the train part
(not only the losing trades), each labelled with the best action over the hold horizon.

Full-batch Adam on cross-entropy at OFFLINE_LEARNING_RATE. The latest
VALIDATION_SHARE of the bars, in time order, is held back to choose when to stop: the
weights with the lowest validation loss are kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from negcase.processes.model import ModelSpec, build_model, state_of
from negcase.schemas.case import ACTIONS

VALIDATION_SHARE = 0.2
# Fixed, apart from the trainers' NEGCASE_LEARNING_RATE (a rate for small steps from a
# checkpoint): the yardstick must not move when training does.
OFFLINE_LEARNING_RATE = 0.01
MAX_EPOCHS = 2000
CHECK_EVERY_EPOCHS = 10
PATIENCE_CHECKS = 20


def train_offline_model(
    spec: ModelSpec,
    features: np.ndarray,
    labels: list[str],
    seed: int,
    learning_rate: float = OFFLINE_LEARNING_RATE,
) -> nn.Module:
    """A model of `spec` trained on `features` (rows in time order) and their best actions,
    in eval mode."""
    torch.manual_seed(seed)
    model = build_model(spec)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor([ACTIONS.index(label) for label in labels], dtype=torch.long)
    split = max(1, math.floor(len(y) * (1 - VALIDATION_SHARE)))
    x_train, y_train, x_valid, y_valid = x[:split], y[:split], x[split:], y[split:]
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    best_loss, best_state, stale = math.inf, state_of(model), 0
    for epoch in range(1, MAX_EPOCHS + 1):
        # forward, backprop and update on every training bar at once
        model.train()
        loss = F.cross_entropy(model(x_train), y_train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if epoch % CHECK_EVERY_EPOCHS or len(y_valid) == 0:
            continue
        # keep the weights that do best on the later bars, stop once they stop improving
        model.eval()
        with torch.no_grad():
            valid_loss = F.cross_entropy(model(x_valid), y_valid).item()
        if valid_loss < best_loss:
            best_loss, best_state, stale = valid_loss, state_of(model), 0
        else:
            stale += 1
            if stale >= PATIENCE_CHECKS:
                break
    if len(y_valid):
        model.load_state_dict(best_state)
    return model.eval()
