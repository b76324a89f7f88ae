"""The embedded Predictor: follows checkpoints like a worker, predicts with no round trip."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.signal import SignalRequestError
from tests.conftest import wait_until
from tests.serving import (
    FEATURES,
    events_of,
    local_probabilities,
    publish,
    stored_model,
    write_bad_checkpoint,
)
from workers.predictor import NoModelYet, Predictor


def test_predictions_follow_each_publish_and_match_a_local_forward_pass(client, settings):
    # given a predictor started before any checkpoint exists
    with Predictor(client, settings, name="engine-1") as predictor:
        with pytest.raises(NoModelYet):
            predictor.predict(FEATURES)
        # when two versions are published one after the other
        for seed in (1, 2):
            version = publish(client, settings, seed=seed)
            wait_until(lambda v=version: predictor.version == v, 30, f"version {version}")
            # then its predictions are that version's forward pass, lists and arrays alike
            expected = local_probabilities(stored_model(client, settings, version), FEATURES)
            for features in (FEATURES, np.array(FEATURES)):
                signal = predictor.predict(features)
                got = [signal.probabilities[a] for a in ("BUY", "SELL", "HOLD")]
                assert got == pytest.approx(expected, abs=1e-6)
                assert signal.model_version == version
    loaded = events_of(client, settings, "checkpoint_loaded")
    assert [(e.details["worker"], e.details["version"]) for e in loaded] == [
        ("engine-1", "1"),
        ("engine-1", "2"),
    ]


def test_a_bad_checkpoint_is_refused_and_predictions_go_on(client, settings):
    # given a predictor on version 1
    publish(client, settings, seed=1)
    with Predictor(client, settings, name="engine-1") as predictor:
        assert predictor.version == 1
        # when a checkpoint with NaN weights is announced
        bad = write_bad_checkpoint(client, settings, "nan_weights")
        wait_until(lambda: events_of(client, settings, "checkpoint_rejected"), 30, "the refusal")
        # then it is refused by name, and version 1 keeps predicting
        (rejected,) = events_of(client, settings, "checkpoint_rejected")
        assert (rejected.details["worker"], rejected.details["version"]) == ("engine-1", str(bad))
        assert "NaN" in rejected.details["reason"]
        assert predictor.predict(FEATURES).model_version == 1


@pytest.mark.parametrize(
    ("features", "field"),
    [
        (FEATURES[:7], "features"),
        ([*FEATURES[:2], float("nan"), *FEATURES[3:]], "features[2]"),
        (np.array(FEATURES[:7]), "features"),
        (np.array([*FEATURES[:5], np.inf, *FEATURES[6:]]), "features[5]"),
        (np.array([*FEATURES[:7], 1e300]), "features[7]"),
    ],
)
def test_bad_features_are_refused_by_name(client, settings, features, field):
    publish(client, settings, seed=1)
    with Predictor(client, settings) as predictor, pytest.raises(SignalRequestError) as caught:
        predictor.predict(features)
    assert caught.value.field == field
