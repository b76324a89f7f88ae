"""Signal requests and replies: validation, the JSON Schemas, and one batch answered in
process (the worker's pure step and its single write)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from negcase.client.signal_client import SignalClient, SignalTimeout
from negcase.processes.inference import DELETED_REASON, NO_MODEL_REASON, InferenceWorker
from negcase.processes.reloader import LoadedModel, Reloader, Serving
from negcase.schemas.signal import (
    SignalRequestError,
    error_reply,
    features_into,
    parse_reply,
    request_fields,
    request_id_of,
    signal_from_probabilities,
)
from negcase.store.keys import INFERENCE_GROUP
from tests.conftest import run_burst
from tests.serving import FEATURES, local_probabilities, seeded_model

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
# Fail at once on a socket timeout: redis-py 8 retries by default.
NO_RETRY = Retry(NoBackoff(), 0)


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"signal_{name}.schema.json").read_text())


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (None, "features", "required"),
        (b"[1, 2", "features", "not a JSON array"),
        (b'{"a": 1}', "features", "expected a JSON array"),
        (b"[1, 2, 3]", "features", "expected 8 numbers, got 3"),
        (b"[1, 2, 3, true, 5, 6, 7, 8]", "features[3]", "expected a number"),
        (b'[1, 2, 3, 4, "5", 6, 7, 8]', "features[4]", "expected a number"),
        (b"[1, 2, 3, 4, 5, 6, 7, 1e300]", "features[7]", "finite float32"),
        (b"[1, null, 3, 4, 5, 6, 7, 8]", "features[1]", "expected a number"),
    ],
)
def test_bad_features_name_the_field_and_reason(raw, field, reason):
    # given a request's features field that cannot be used
    row = np.zeros(8, np.float32)
    # when it is decoded, then the error names the field and why
    with pytest.raises(SignalRequestError) as caught:
        features_into(raw, row)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_good_features_land_in_the_row_as_float32():
    row = np.zeros(8, np.float32)
    features_into(orjson.dumps(FEATURES), row)
    assert row.tolist() == pytest.approx(FEATURES)


@pytest.mark.parametrize("request_id", [None, b"", b"has space", b"x" * 129, b"a/b"])
def test_a_request_id_that_cannot_name_a_reply_key_is_refused(request_id):
    fields = {} if request_id is None else {b"request_id": request_id}
    with pytest.raises(SignalRequestError) as caught:
        request_id_of(fields)
    assert caught.value.field == "request_id"


def test_requests_match_the_request_schema_and_its_features():
    # given the fields SignalClient sends
    fields = {k.decode(): v.decode() for k, v in request_fields("r-1", FEATURES).items()}
    request_schema = schema("request")
    # then they validate, and so does the array inside the features text
    jsonschema.validate(fields, request_schema)
    features_schema = {**request_schema["$defs"]["features"], "$schema": request_schema["$schema"]}
    jsonschema.validate(json.loads(fields["features"]), features_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**fields, "request_id": "no spaces allowed"}, request_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([1, 2, 3], features_schema)


def test_signal_and_error_replies_match_the_reply_schema_and_read_back():
    reply_schema = schema("reply")
    # given a signal reply and an error reply as a worker writes them
    signal = signal_from_probabilities([0.2, 0.7, 0.1], 4, "r-1", "w", 3)
    error = error_reply("r-2", "features", "expected 8 numbers, got 3", 4, "w", 3)
    # then both validate; a signal without probabilities does not
    jsonschema.validate(orjson.loads(signal.to_json()), reply_schema)
    jsonschema.validate(orjson.loads(error), reply_schema)
    broken = {k: v for k, v in orjson.loads(signal.to_json()).items() if k != "probabilities"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, reply_schema)
    # and they read back as a Signal and as the error naming the field
    assert parse_reply(signal.to_json()) == signal
    assert signal.action == "SELL" and signal.confidence == 0.7
    with pytest.raises(SignalRequestError, match="features: expected 8"):
        parse_reply(error)


def worker_for(client, settings) -> InferenceWorker:
    return InferenceWorker(client, settings, "w1", Reloader(client, settings, "w1"))


def test_one_batch_is_answered_by_one_forward_pass_of_the_given_model(client, settings):
    # given a loaded model and a batch of good, bad and unanswerable requests
    model = seeded_model(settings, 1).eval()
    loaded = LoadedModel(7, model)
    other = [0.5] * 8
    entries = [
        (b"1-0", request_fields("good-1", FEATURES)),
        (b"2-0", {b"request_id": b"bad-1", b"features": b"[1, 2]"}),
        (b"3-0", {b"features": orjson.dumps(FEATURES)}),
        (b"4-0", request_fields("good-2", other)),
    ]
    # when the worker answers it
    batch = worker_for(client, settings).answer(entries, Serving(loaded))
    replies = {request_id: orjson.loads(raw) for request_id, raw in batch.replies}
    # then the good ones carry the local forward pass of that model, all from version 7
    for request_id, features in (("good-1", FEATURES), ("good-2", other)):
        probabilities = replies[request_id]["probabilities"]
        expected = local_probabilities(model, features)
        assert [probabilities[a] for a in ("BUY", "SELL", "HOLD")] == pytest.approx(expected)
        assert replies[request_id]["model_version"] == 7
    # the bad one gets an error naming the field; the one without an id is dead-lettered
    assert replies["bad-1"]["error"] == {"field": "features", "reason": "expected 8 numbers, got 2"}
    assert [dead.field for dead in batch.dead] == ["request_id"]
    assert batch.handled_ids == [b"1-0", b"2-0", b"3-0", b"4-0"]
    assert batch.counters == {
        "signals": 2,
        "signal_errors": 1,
        "signals_dead": 1,
        "model:7:signals": 2,
    }


def test_a_version_in_service_that_defers_to_the_rule_has_no_opinion_and_a_canary_has(
    client, settings
):
    # given a confident model in service that defers to the engine's rule, and the same
    # model on trial as the canary for every request
    model = LoadedModel(7, seeded_model(settings, 1))
    confident = settings.with_overrides(min_confidence=0.0)
    entries = [(b"1-0", request_fields("r", FEATURES))]
    worker = InferenceWorker(client, confident, "w1", Reloader(client, confident, "w1"))
    for canary_share, canary in ((0.0, False), (1.0, True)):
        serving = Serving(model, model if canary else None, canary_share, service_defers=True)
        # when a request is answered, then only the canary's reply carries an opinion
        reply = orjson.loads(worker.answer(entries, serving).replies[0][1])
        assert (reply["canary"], reply["opinion"]) == (canary, canary)
        assert reply["model_version"] == 7 and reply["confidence"] > 0


def test_without_a_model_every_request_gets_the_no_model_error(client, settings):
    batch = worker_for(client, settings).answer(
        [(b"1-0", request_fields("r", FEATURES))], Serving()
    )
    ((_, raw),) = batch.replies
    assert orjson.loads(raw)["error"] == {"field": "model", "reason": NO_MODEL_REASON}


def test_a_batch_is_written_acknowledged_and_deleted_in_one_go(client, settings):
    # given two requests read by a worker
    keys = settings.keys
    worker = worker_for(client, settings)
    worker.store.ensure_group()
    client.xadd(keys.requests, request_fields("r-1", FEATURES))
    client.xadd(keys.requests, {"features": "[]"})
    entries = worker.store.read_new("w1", 10, None)
    # when the batch is answered and written
    worker.handle(entries)
    # then the reply waits on its list with a TTL, the dead one is kept with its reason,
    # and the stream holds nothing pending or left over
    reply_key = keys.reply("r-1")
    assert 0 < client.ttl(reply_key) <= settings.reply_ttl_s
    assert orjson.loads(client.lpop(reply_key))["error"]["field"] == "model"
    ((_, dead),) = client.xrange(keys.requests_dead)
    assert dead[b"dead:reason"] == b"request_id: required"
    assert client.xpending(keys.requests, INFERENCE_GROUP)["pending"] == 0
    assert client.xlen(keys.requests) == 0
    assert client.hget(keys.stats, "signal_errors") == b"1"


def test_an_oversized_request_gets_an_error_reply_or_is_dead_lettered(client, settings):
    # given requests over the size limit, with and without a usable request_id
    settings = settings.with_overrides(max_request_bytes=1000)
    padding = b"x" * 1000
    entries = [
        (b"1-0", {**request_fields("big", FEATURES), b"padding": padding}),
        (b"2-0", {b"features": orjson.dumps(FEATURES), b"padding": padding}),
        (b"3-0", request_fields("small", FEATURES)),
    ]
    # when a worker answers them
    served = Serving(LoadedModel(7, seeded_model(settings, 1)))
    batch = worker_for(client, settings).answer(entries, served)
    replies = {request_id: orjson.loads(raw) for request_id, raw in batch.replies}
    # then the one with an id is told why, the other is kept with its reason, and a request
    # under the limit is answered as usual
    size = sum(len(name) + len(value) for name, value in entries[0][1].items())
    assert replies["big"]["error"] == {
        "field": "request",
        "reason": f"{size} bytes, over the limit of 1000",
    }
    assert [(dead.entry_id, dead.field) for dead in batch.dead] == [(b"2-0", "request_id")]
    assert replies["small"]["model_version"] == 7 and "error" not in replies["small"]


def abandon(client, settings, deleted: int, kept: int) -> list[bytes]:
    """Requests read by a worker that then died; the first `deleted` of them trimmed away."""
    keys = settings.keys
    client.xgroup_create(keys.requests, INFERENCE_GROUP, id="0", mkstream=True)
    ids = [
        client.xadd(keys.requests, request_fields(f"r-{i}", FEATURES))
        for i in range(deleted + kept)
    ]
    client.xreadgroup(INFERENCE_GROUP, "died", {keys.requests: ">"})
    client.xdel(keys.requests, *ids[:deleted])
    return ids


def test_claiming_finds_deleted_pending_requests_by_id_and_follows_the_cursor(client, settings):
    # given three abandoned requests, the first two deleted before anyone answered them
    ids = abandon(client, settings, deleted=2, kept=1)
    store = worker_for(client, settings).store
    # when another worker claims them two at a time, answering (here: acknowledging) each page
    pages = []
    for page in store.claim_abandoned("w1", 0, 2):
        pages.append(page)
        client.xack(settings.keys.requests, INFERENCE_GROUP, *(entry_id for entry_id, _ in page))
    # then the deleted ones come with their ids and no fields, and the one behind them too
    assert pages == [[(ids[0], {}), (ids[1], {})], [(ids[2], request_fields("r-2", FEATURES))]]
    assert store.pending() == 0


def test_burst_ends_when_trimmed_requests_fill_the_front_of_the_pending_list(client, settings):
    # given more deleted pending requests than one claim takes, then one still there
    settings = settings.with_overrides(serve_batch_size=2, claim_idle_ms=0)
    ids = abandon(client, settings, deleted=3, kept=1)
    worker = worker_for(client, settings)
    # when a worker runs in burst mode (stopped after a while if it would never end)
    totals = run_burst(worker)
    # then it ended by itself, having answered the live request and dead-lettered the others
    assert (totals.errors, totals.dead) == (1, 3)  # no model loaded: an error reply
    assert orjson.loads(client.lpop(settings.keys.reply("r-3")))["request_id"] == "r-3"
    dead = client.xrange(settings.keys.requests_dead)
    assert [fields[b"dead:entry_id"] for _, fields in dead] == ids[:3]
    assert {fields[b"dead:reason"] for _, fields in dead} == {f"request: {DELETED_REASON}".encode()}
    assert client.xpending(settings.keys.requests, INFERENCE_GROUP)["pending"] == 0


@pytest.mark.parametrize("timeout_s", [0, 0.0, -1, float("nan")])
def test_a_timeout_that_is_not_positive_is_refused(client, settings, timeout_s):
    # (BLPOP 0 would block forever; a socket timeout keeps a regression from hanging here)
    impatient = redis.Redis.from_url(settings.redis_url, socket_timeout=2, retry=NO_RETRY)
    with pytest.raises(ValueError, match="timeout_s"):
        SignalClient(impatient, settings.namespace).request(FEATURES, timeout_s=timeout_s)
    assert client.xlen(settings.keys.requests) == 0  # nothing was sent


def test_a_timeout_under_a_millisecond_times_out_instead_of_waiting_forever(client, settings):
    impatient = redis.Redis.from_url(settings.redis_url, socket_timeout=2, retry=NO_RETRY)
    with pytest.raises(SignalTimeout):
        SignalClient(impatient, settings.namespace).request(FEATURES, timeout_s=0.0004)


def test_a_wait_longer_than_the_socket_timeout_still_gets_its_reply(client, settings):
    # given an engine whose socket timeout is shorter than it is willing to wait
    impatient = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, retry=NO_RETRY)
    signals = SignalClient(impatient, settings.namespace)
    answer = threading.Thread(target=answer_late, args=(client, settings, 1.0), daemon=True)
    answer.start()
    # when the reply comes after more than one socket timeout, then it is received
    assert signals.request(FEATURES, timeout_s=20).request_id.startswith(signals._prefix)
    answer.join(5)


def test_a_client_with_redis_py_s_default_socket_timeout_waits_out_its_timeout(settings):
    # given a client made without a socket timeout, whose connections still get redis-py's
    # own default (5 s since redis-py 8.0), which connection_kwargs does not show
    default = redis.Redis.from_url(settings.redis_url, retry=NO_RETRY)
    connection = default.connection_pool.get_connection()
    socket_timeout_s = connection.socket_timeout
    default.connection_pool.release(connection)
    assert "socket_timeout" not in default.connection_pool.connection_kwargs
    assert socket_timeout_s, "no implicit socket timeout left to outlast: this proves nothing"
    # when it waits longer than that timeout, then it gets SignalTimeout, not a TimeoutError
    with pytest.raises(SignalTimeout):
        SignalClient(default, settings.namespace).request(
            FEATURES, timeout_s=socket_timeout_s + 0.5
        )


def answer_late(client, settings, after_s: float) -> None:
    """Answer the first request on the stream `after_s` after it arrives, as a slow worker."""
    ((_, [(_, fields)]),) = client.xread({settings.keys.requests: "0-0"}, count=1, block=20_000)
    time.sleep(after_s)
    request_id = fields[b"request_id"].decode()
    reply = signal_from_probabilities([0.2, 0.7, 0.1], 1, request_id)
    client.rpush(settings.keys.reply(request_id), reply.to_json())


def test_a_reply_under_the_confidence_threshold_says_it_has_no_opinion() -> None:
    """Given probabilities with no action over the threshold, then the reply says so on the
    wire, and an engine reading it sees `opinion` false (and true for a confident one)."""
    unsure = signal_from_probabilities([0.4, 0.35, 0.25], 3, "r-1", min_confidence=0.5)
    sure = signal_from_probabilities([0.7, 0.2, 0.1], 3, "r-2", min_confidence=0.5)
    assert parse_reply(unsure.to_json()).opinion is False
    assert parse_reply(sure.to_json()).opinion is True
    assert orjson.loads(unsure.to_json())["opinion"] is False
