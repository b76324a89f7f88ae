"""`negcase serve` and `negcase predict` as real processes against a real Redis."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import orjson
import pytest

from negcase.client.signal_client import SignalClient
from negcase.processes.inference import NO_MODEL_REASON
from negcase.schemas.signal import SignalRequestError, request_fields
from tests.conftest import ROOT, wait_until, worker_env
from tests.serving import FEATURES, local_probabilities, publish, stored_model

pytestmark = pytest.mark.slow


def test_replies_match_a_local_forward_pass_of_the_same_version(client, settings, spawn):
    # given a published checkpoint and a running worker
    version = publish(client, settings, seed=1)
    spawn("serve", "--consumer", "w1")
    signals = SignalClient(client, settings.namespace)
    model = stored_model(client, settings, version)
    rng = np.random.default_rng(0)
    # when the engine asks for signals on different features
    for features in [FEATURES, *rng.normal(size=(5, 8)).tolist()]:
        reply = signals.request(features, timeout_s=30)
        # then each reply is that version's forward pass, with the action it favours
        expected = local_probabilities(model, features)
        got = [reply.probabilities[action] for action in ("BUY", "SELL", "HOLD")]
        assert got == pytest.approx(expected, abs=1e-6)
        assert reply.model_version == version and reply.worker == "w1"
        assert reply.confidence == max(got)
        assert reply.action == ("BUY", "SELL", "HOLD")[int(np.argmax(got))]


def test_bad_requests_get_error_replies_and_serving_goes_on(client, settings, spawn):
    # given a worker serving version 1
    publish(client, settings, seed=1)
    spawn("serve")
    signals = SignalClient(client, settings.namespace)
    # when requests with bad features arrive, and one without a request_id
    with pytest.raises(SignalRequestError) as caught:
        signals.request([1.0, 2.0], timeout_s=30)
    assert (caught.value.field, caught.value.reason) == ("features", "expected 8 numbers, got 2")
    with pytest.raises(SignalRequestError) as caught:
        signals.request([*FEATURES[:7], "x"], timeout_s=30)
    assert caught.value.field == "features[7]"
    client.xadd(settings.keys.requests, {"features": orjson.dumps(FEATURES)})
    # then good requests are still answered, and the unanswerable one is kept with its reason
    assert signals.request(FEATURES, timeout_s=30).model_version == 1
    wait_until(lambda: client.xlen(settings.keys.requests_dead) == 1, 30, "the dead request")
    ((_, dead),) = client.xrange(settings.keys.requests_dead)
    assert dead[b"dead:field"] == b"request_id"


def test_before_any_checkpoint_the_reply_says_no_model_yet(client, settings, spawn):
    spawn("serve")
    with pytest.raises(SignalRequestError) as caught:
        SignalClient(client, settings.namespace).request(FEATURES, timeout_s=30)
    assert (caught.value.field, caught.value.reason) == ("model", NO_MODEL_REASON)


def test_burst_answers_every_queued_request_then_exits(client, settings, spawn):
    # given 600 queued requests (more than two batches) and a published model
    publish(client, settings, seed=1)
    pipe = client.pipeline(transaction=False)
    for i in range(600):
        pipe.xadd(settings.keys.requests, request_fields(f"r-{i}", FEATURES))
    pipe.execute()
    # when a worker runs in burst mode
    worker = spawn("serve", "--burst", "--batch-size", "256")
    _, stderr = worker.communicate(timeout=60)
    # then it exits 0 after answering each one exactly once, in three batches
    assert worker.returncode == 0, stderr
    assert "600 signals" in stderr and ", 3 batches" in stderr
    assert all(client.llen(settings.keys.reply(f"r-{i}")) == 1 for i in range(600))
    assert client.xlen(settings.keys.requests) == 0


def test_sigterm_stops_the_worker_cleanly(client, settings, spawn):
    publish(client, settings, seed=1)
    worker = spawn("serve")
    SignalClient(client, settings.namespace).request(FEATURES, timeout_s=30)
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr
    assert "1 signals" in stderr


def test_negcase_predict_prints_the_reply(client, settings, spawn):
    # given a worker serving version 1
    publish(client, settings, seed=1)
    spawn("serve")
    # when `negcase predict` asks, with good and with bad features
    good = run_predict(settings, orjson.dumps(FEATURES).decode())
    bad = run_predict(settings, "[1, 2]")
    # then it prints the reply as JSON; an error reply names the field and exits 1
    assert good.returncode == 0, good.stderr
    assert orjson.loads(good.stdout)["model_version"] == 1
    assert bad.returncode == 1
    assert orjson.loads(bad.stdout)["error"]["field"] == "features"
    # and without --json, one line for people
    text = run_predict(settings, orjson.dumps(FEATURES).decode(), json=False)
    assert text.returncode == 0 and "model v1" in text.stdout and "HOLD" in text.stdout


def run_predict(settings, features: str, json: bool = True) -> subprocess.CompletedProcess[str]:
    output = ["--json"] if json else []
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "negcase",
            "predict",
            "--features",
            features,
            "--timeout-s",
            "30",
            *output,
        ],
        cwd=ROOT,
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_model_names_the_factory_that_train_model_names(client, settings, spawn):
    # given a checkpoint trained with `--model tests.serving:small_mlp`
    trained = settings.with_overrides(model_factory="tests.serving:small_mlp")
    version = publish(client, trained, seed=1)
    # when a worker is told the same factory on its command line
    spawn("serve", "--model", "tests.serving:small_mlp")
    # then it loads that checkpoint and answers with that model's forward pass
    reply = SignalClient(client, settings.namespace).request(FEATURES, timeout_s=30)
    expected = local_probabilities(stored_model(client, trained, version), FEATURES)
    got = [reply.probabilities[action] for action in ("BUY", "SELL", "HOLD")]
    assert reply.model_version == version
    assert got == pytest.approx(expected, abs=1e-6)
