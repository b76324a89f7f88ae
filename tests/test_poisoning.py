"""Poisoning: no case, however hostile its numbers, can get a checkpoint with NaN or
infinity published. The model trains and serves in float32, so that is the dtype every
check is about."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from negcase.processes.inference import NONFINITE_OUTPUT_REASON, InferenceWorker
from negcase.processes.model import build_model, spec_from_settings
from negcase.processes.reloader import LoadedModel, Reloader, Serving
from negcase.processes.trainer import Trainer
from negcase.schemas.signal import request_fields
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry, WeightsRefused
from tests.conftest import run_burst, worker_env
from tests.training_cases import add_cases, assert_conserved, make_case

FLOAT32_MAX = float(np.finfo(np.float32).max)


def published_weights(client, settings) -> dict[int, dict[str, np.ndarray]]:
    """Every checkpoint in Redis and in the archive, by version."""
    registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir))
    return {
        info.version: safetensors.numpy.load(registry.fetch_anywhere(info.version).weights)
        for info in registry.list()
    }


def assert_all_finite(client, settings) -> None:
    for version, tensors in published_weights(client, settings).items():
        for name, tensor in tensors.items():
            assert np.isfinite(tensor).all(), f"v{version} {name} holds NaN or infinity"


def test_a_feature_beyond_float32_is_a_dead_letter_and_never_trained(
    client, settings, spawn
) -> None:
    # given the repro: one loss whose first feature is finite as a float64 only
    client.xadd(
        settings.keys.trades,
        {
            "trade_id": "poison",
            "symbol": "X",
            "side": "BUY",
            "entry_price": "2",
            "exit_price": "1",
            "features": "[1e300,0.1,0.1,0.1,0.1,0.1,0.1,0.1]",
        },
    )
    # when a detector and a trainer drain it
    assert spawn("detect", "--burst").wait(60) == 0
    assert spawn("train", "--burst", env=worker_env(settings, NEGCASE_LEASE_S="5")).wait(60) == 0
    # then it is a dead letter naming the feature, and nothing was published from it
    ((_, dead),) = client.xrange(settings.keys.trades_dead)
    assert dead[b"dead:field"] == b"features[0]"
    assert b"float32" in dead[b"dead:reason"]
    assert CheckpointRegistry(client, settings.keys).latest_version() is None
    assert_all_finite(client, settings)


def test_a_case_stored_with_such_a_feature_fails_without_training(client, settings) -> None:
    # given a case stored before features were checked in float32
    add_cases(client, settings, [make_case(1, [1e300] + [0.1] * 7, epochs=20)])
    # when a trainer meets it, it is not trained (it ends dead after its attempts)
    quick = settings.with_overrides(lease_s=5.0, min_outcomes=0)
    run_burst(Trainer(client, quick, "t1", None), timeout_s=120)
    assert client.hget(settings.keys.dead, "nc-test-00001").startswith(b"features")
    assert CheckpointRegistry(client, settings.keys).latest_version() is None


def test_weights_with_nan_are_never_published(client, settings) -> None:
    registry = CheckpointRegistry(client, settings.keys)
    weights = safetensors.numpy.save({"w": np.array([1.0, np.nan], dtype=np.float32)})
    with pytest.raises(WeightsRefused):
        registry.publish(weights, "0" * 64, {"feature_count": 8}, None)
    assert registry.latest_version() is None and client.zcard(settings.keys.versions) == 0


# Finite float32 values, with the extremes and the tiny ones weighted in: any of them is a
# valid feature, and several together overflow a forward pass.
extreme = st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, 1e38, -1e38, 1e30, 1e-45, 0.0, -0.0])
features = st.lists(
    st.one_of(extreme, st.floats(-FLOAT32_MAX, FLOAT32_MAX, width=32), st.floats(-3, 3)),
    min_size=8,
    max_size=8,
)
case_sets = st.lists(
    st.tuples(features, st.sampled_from(["BUY", "SELL", "HOLD"]), st.integers(1, 5)),
    min_size=1,
    max_size=6,
)


@hypothesis_settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ordinary=st.integers(0, 4), hostile=case_sets)
def test_no_checkpoint_with_a_non_finite_weight_is_published_whatever_the_cases(
    client, settings, ordinary, hostile
) -> None:
    torch.set_num_threads(1)
    client.flushall()
    # given some ordinary cases and some with extreme (but float32-finite) features
    cases = [make_case(n, [0.5 - n / 10] * 8, epochs=20) for n in range(ordinary)]
    cases += [
        make_case(100 + n, values, action=action, priority=priority, epochs=40)
        for n, (values, action, priority) in enumerate(hostile)
    ]
    add_cases(client, settings, cases)
    # when a trainer works through all of them, several per session
    quick = settings.with_overrides(
        lease_s=10.0,
        cases_per_claim=2,
        early_stop_patience=0,
        heldout_share=0.3,
        min_outcomes=0,
    )
    trainer = Trainer(client, quick, "t1", Archive(quick.data_dir))
    run_burst(trainer, timeout_s=120)
    # then it lived, every case ended, and every checkpoint it published is finite
    counts = assert_conserved(client, settings)
    assert counts["queued"] == counts["leased"] == 0
    assert_all_finite(client, settings)
    for _, fields in client.xrange(settings.keys.events):
        if fields[b"type"] == b"training_completed" and fields[b"outcome"] == b"rejected":
            reason = fields[b"rejected_reason"].decode()
            assert "NaN" in reason or "not finite" in reason or "loss" in reason, reason


def test_a_request_whose_forward_pass_overflows_gets_an_error_not_nan(client, settings) -> None:
    # given a served model, and a request of finite float32 features that overflow it
    torch.manual_seed(0)
    model = build_model(spec_from_settings(settings)).eval()
    worker = InferenceWorker(client, settings, "w1", Reloader(client, settings, "w1"))
    entries = [
        (b"1-0", request_fields("huge", [FLOAT32_MAX, -FLOAT32_MAX] * 4)),
        (b"2-0", request_fields("fine", [0.1] * 8)),
    ]
    # when it answers them
    batch = worker.answer(entries, Serving(service=LoadedModel(3, model)))
    replies = {request_id: orjson.loads(raw) for request_id, raw in batch.replies}
    # then the overflowing one gets an error naming the features, the other a signal
    assert replies["huge"]["error"] == {"field": "features", "reason": NONFINITE_OUTPUT_REASON}
    assert all(math.isfinite(p) for p in replies["fine"]["probabilities"].values())
    assert batch.counters["signals"] == 1 and batch.counters["signal_errors"] == 1
