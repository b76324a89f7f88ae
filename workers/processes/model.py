"""The model: features in, one logit per action (BUY, SELL, HOLD) out; its weights as
safetensors bytes, and the checks a checkpoint must pass before any model loads it."""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import safetensors.torch
import torch
from torch import nn

from negcase.runtime.settings import Settings
from negcase.schemas.case import ACTIONS
from negcase.store.checkpoints import StoredCheckpoint

N_ACTIONS = len(ACTIONS)


class CheckpointError(Exception):
    """A checkpoint that must not be loaded; `reason` says which check it failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelFactory(Protocol):
    """What `--model package.module:factory` names: a callable that builds the network.
    It gets the input width and the number of actions and returns an nn.Module mapping a
    (batch, feature_count) float32 tensor to (batch, n_actions) logits, in the order of
    ACTIONS: BUY, SELL, HOLD."""

    def __call__(self, *, feature_count: int, n_actions: int) -> nn.Module: ...


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What builds a model: the input width, the MLP's hidden sizes, or a user factory."""

    feature_count: int
    hidden_sizes: tuple[int, ...] = (64, 64)
    factory: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoint metadata."""
        return {
            "feature_count": self.feature_count,
            "hidden_sizes": list(self.hidden_sizes),
            "factory": self.factory,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec stored in checkpoint metadata."""
        return cls(
            feature_count=int(data["feature_count"]),
            hidden_sizes=tuple(int(size) for size in data.get("hidden_sizes", ())),
            factory=data.get("factory"),
        )


def spec_from_settings(settings: Settings) -> ModelSpec:
    """The model the settings describe (NEGCASE_FEATURE_COUNT, _HIDDEN_SIZES, _MODEL_FACTORY)."""
    return ModelSpec(settings.feature_count, settings.hidden_sizes, settings.model_factory)


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh model: the default MLP, or `factory(feature_count=..., n_actions=3)`."""
    if spec.factory:
        return _load_factory(spec.factory)(feature_count=spec.feature_count, n_actions=N_ACTIONS)
    layers: list[nn.Module] = []
    width = spec.feature_count
    for size in spec.hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, N_ACTIONS))
    return nn.Sequential(*layers)


def _load_factory(path: str) -> Any:
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"model factory {path!r}: expected 'package.module:callable'")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(factory):
        raise ValueError(f"model factory {path!r}: {attribute} is not callable in {module_name}")
    return factory


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A float32 copy of the model's state dict, detached from the model."""
    return {
        name: value.detach().to(torch.float32).clone() for name, value in model.state_dict().items()
    }


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors encoding of a state dict (contiguous float32; never pickle)."""
    return safetensors.torch.save(
        {name: value.to(torch.float32).contiguous() for name, value in state.items()}
    )


def sha256_hex(data: bytes) -> str:
    """The hex sha256 a checkpoint is stored and announced with."""
    return hashlib.sha256(data).hexdigest()


def verified_state(
    stored: StoredCheckpoint, model: nn.Module, feature_count: int
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, or CheckpointError unless sha256, safetensors format, tensor
    names and shapes, finite values and the feature count all match `model`."""
    version = stored.version
    if sha256_hex(stored.weights) != stored.sha256:
        raise CheckpointError(f"v{version}: sha256 does not match the weights")
    if stored.meta.get("feature_count") != feature_count:
        raise CheckpointError(
            f"v{version}: feature_count {stored.meta.get('feature_count')!r}, "
            f"the model takes {feature_count}"
        )
    try:
        tensors = safetensors.torch.load(stored.weights)
    except Exception as error:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(f"v{version}: not safetensors ({error})") from None
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in tensors.items()}
    if found.keys() != expected.keys():
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        raise CheckpointError(
            f"v{version}: tensor names differ (missing {missing}, extra {unexpected})"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"v{version}: {name} has shape {found[name]}, expected {shape}")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise CheckpointError(f"v{version}: {name} holds NaN or infinity")
    return tensors


def nonfinite_name(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor in `state` holding NaN or infinity, or None."""
    for name, value in state.items():
        if not bool(torch.isfinite(value).all()):
            return name
    return None


def load_verified(stored: StoredCheckpoint, model: nn.Module, feature_count: int) -> None:
    """Load a checkpoint into `model` after every check of `verified_state` passed; on
    CheckpointError the model is left untouched."""
    model.load_state_dict(verified_state(stored, model, feature_count))


def rebased(
    latest: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """latest + (trained - base): one trainer's update replayed on top of another's."""
    return {name: latest[name] + (trained[name] - base[name]) for name in latest}
