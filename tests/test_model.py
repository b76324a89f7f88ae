"""The model and checkpoint verification: what loads, and every reason a checkpoint is refused."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from torch import nn

from negcase.processes.model import (
    CheckpointError,
    ModelSpec,
    build_model,
    load_verified,
    rebased,
    sha256_hex,
    state_of,
    weights_bytes,
)
from negcase.store.checkpoints import StoredCheckpoint

SPEC = ModelSpec(feature_count=8, hidden_sizes=(16, 16))


def tiny_net(feature_count: int, n_actions: int) -> nn.Module:
    """A user's own network, for the --model plug-in test."""
    return nn.Sequential(nn.Linear(feature_count, 4), nn.Tanh(), nn.Linear(4, n_actions))


def stored_from(model: nn.Module, version: int = 1, feature_count: int = 8) -> StoredCheckpoint:
    weights = weights_bytes(state_of(model))
    meta = {"version": version, "feature_count": feature_count}
    return StoredCheckpoint(version, meta, weights, sha256_hex(weights))


def test_default_model_maps_features_to_three_action_logits() -> None:
    model = build_model(SPEC)
    assert model(torch.zeros(5, 8)).shape == (5, 3)


def test_spec_survives_metadata_round_trip() -> None:
    spec = ModelSpec(8, (32,), "tests.test_model:tiny_net")
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_factory_builds_the_users_module() -> None:
    model = build_model(ModelSpec(6, (), "tests.test_model:tiny_net"))
    assert isinstance(model[1], nn.Tanh)
    assert model(torch.zeros(2, 6)).shape == (2, 3)


@pytest.mark.parametrize("path", ["no_colon", "tests.test_model:SPEC", ":tiny_net"])
def test_bad_factory_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="model factory"):
        build_model(ModelSpec(6, (), path))


def test_a_good_checkpoint_loads_the_exact_weights() -> None:
    source, target = build_model(SPEC), build_model(SPEC)
    load_verified(stored_from(source), target, feature_count=8)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value)


def _corrupt_sha(stored: StoredCheckpoint) -> StoredCheckpoint:
    return dataclasses.replace(stored, sha256="0" * 64)


def _not_safetensors(stored: StoredCheckpoint) -> StoredCheckpoint:
    junk = b"\x80\x04 this is a pickle, not safetensors"
    return dataclasses.replace(stored, weights=junk, sha256=sha256_hex(junk))


def _with_tensors(stored: StoredCheckpoint, change) -> StoredCheckpoint:
    tensors = safetensors.torch.load(stored.weights)
    change(tensors)
    weights = safetensors.torch.save(tensors)
    return dataclasses.replace(stored, weights=weights, sha256=sha256_hex(weights))


def _nan(stored: StoredCheckpoint) -> StoredCheckpoint:
    return _with_tensors(stored, lambda t: t["0.weight"].__setitem__((0, 0), float("nan")))


def _wrong_shape(stored: StoredCheckpoint) -> StoredCheckpoint:
    return _with_tensors(stored, lambda t: t.__setitem__("0.bias", torch.zeros(3)))


def _extra_tensor(stored: StoredCheckpoint) -> StoredCheckpoint:
    return _with_tensors(stored, lambda t: t.__setitem__("extra", torch.zeros(1)))


def _other_feature_count(stored: StoredCheckpoint) -> StoredCheckpoint:
    return dataclasses.replace(stored, meta={**stored.meta, "feature_count": 9})


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_corrupt_sha, "sha256"),
        (_not_safetensors, "not safetensors"),
        (_nan, "NaN"),
        (_wrong_shape, "shape"),
        (_extra_tensor, "names differ"),
        (_other_feature_count, "feature_count"),
    ],
)
def test_a_bad_checkpoint_is_refused_and_the_model_is_untouched(damage, reason: str) -> None:
    target = build_model(SPEC)
    before = state_of(target)
    with pytest.raises(CheckpointError, match=reason):
        load_verified(damage(stored_from(build_model(SPEC))), target, feature_count=8)
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name])


def test_rebase_replays_one_update_on_top_of_another() -> None:
    base = {"w": torch.tensor([1.0, 1.0])}
    latest = {"w": torch.tensor([2.0, 1.0])}  # someone else's update moved w[0]
    trained = {"w": torch.tensor([1.0, 3.0])}  # ours moved w[1]
    assert torch.equal(rebased(latest, trained, base)["w"], torch.tensor([2.0, 3.0]))
