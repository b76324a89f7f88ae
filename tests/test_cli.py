"""The negcase command as people use it: real processes against the test Redis."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import safetensors.numpy

from negcase import __version__ as negcase_version
from negcase.cli.main import build_parser
from negcase.processes.model import sha256_hex, state_of, weights_bytes
from negcase.schemas.event import CATALOGUE, NUMBER_FIELDS
from negcase.store.archive import Archive
from negcase.store.cases import RATE_BUCKET_S, rate_bucket_s
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.local_redis import free_port, redis_server_binary
from tests.conftest import ROOT, negcase, wait_until, worker_env
from tests.serving import checkpoint_meta, seeded_model


def publish_loss(settings, trade_id: str, *more: str) -> None:
    """Publish a BUY at 3000 closed at 2970: a 1 % loss, priority 1, without features."""
    trade = f"--trade-id {trade_id} --symbol X --side BUY --entry 3000 --exit 2970".split()
    assert negcase(settings, "publish", *trade, *more).returncode == 0


def test_every_command_explains_itself():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    undescribed = [name for name, sub in commands.items() if not sub.description]
    assert undescribed == []


def test_publish_detect_status_tail(settings):
    # given trades published from flags and from JSON lines on stdin
    loss = negcase(
        settings,
        "publish",
        "--trade-id",
        "t1",
        "--symbol",
        "ETH/USDT",
        "--side",
        "BUY",
        "--entry",
        "3000",
        "--exit",
        "2970",
        "--features",
        "[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8]",
    )
    assert loss.returncode == 0, loss.stderr
    lines = "\n".join(
        json.dumps(t)
        for t in [
            {
                "trade_id": "t2",
                "symbol": "BTC/USDT",
                "side": "SELL",
                "entry_price": 100,
                "exit_price": 90,
            },
            {
                "trade_id": "t3",
                "symbol": "BTC/USDT",
                "side": "SELL",
                "entry_price": -1,
                "exit_price": 90,
            },
        ]
    )
    batch = negcase(settings, "publish", "--file", "-", "--encoding", "json", input_text=lines)
    assert batch.returncode == 0 and "published 2" in batch.stdout
    # when a detector drains the stream
    detect = negcase(settings, "detect", "--burst")
    assert detect.returncode == 0, detect.stderr
    # then status shows the case, the win and the dead letter
    status = json.loads(negcase(settings, "status", "--json").stdout)
    assert status["cases"]["queued_by_priority"]["1"] == 1
    assert status["counters"]["wins"] == 1 and status["trades"]["dead_letters"] == 1
    assert status["trades"]["pending"] == 0
    assert "entry_price: must be > 0" in status["trades"]["latest_dead_reasons"][0]
    assert "per model version" in negcase(settings, "status").stdout
    # and tail shows readable lines
    tail = negcase(settings, "tail", "--last", "5", "--count", "2")
    assert "NEGATIVE CASE ADDED" in tail.stdout and "Priority: 1" in tail.stdout
    assert "Loss: $30.00 (1.0%)" in tail.stdout
    assert "DEAD LETTER" in tail.stdout


def test_publish_a_skipped_decision_from_flags(settings):
    # given a skip published from flags: the market rose 3 % while the engine stayed out
    skip = "--trade-id s1 --symbol X --side hold --entry 100 --exit 103 --features"
    assert negcase(settings, "publish", *skip.split(), json.dumps([0] * 8)).returncode == 0
    # when a detector drains the stream
    assert negcase(settings, "detect", "--burst").returncode == 0
    # then it is a missed opportunity, prioritized by the 3 % it missed
    status = json.loads(negcase(settings, "status", "--json").stdout)
    assert status["counters"]["opportunities"] == 1
    assert status["cases"]["queued_by_priority"]["3"] == 1
    case = json.loads(negcase(settings, "case", "s1", "--json").stdout)
    assert case["case"]["what_should_have_been_done"] == "BUY"


def test_tail_filters_by_type(settings):
    negcase(settings, "publish", "--symbol", "X", "--side", "BUY", "--entry", "1", "--exit", "0.5")
    negcase(settings, "publish", "--symbol", "X", "--side", "BUY", "--entry", "-1", "--exit", "1")
    negcase(settings, "detect", "--burst")
    tail = negcase(settings, "tail", "--type", "dead_lettered", "--count", "1", "--json")
    assert json.loads(tail.stdout)["type"] == "dead_lettered"


def test_health_follows_a_running_worker(settings, spawn, client):
    assert negcase(settings, "health", "--kind", "detector").returncode == 1
    detector = spawn("detect", "--block-ms", "100")
    wait_until(
        lambda: negcase(settings, "health", "--kind", "detector").returncode == 0,
        what="the detector's health key",
    )
    detector.terminate()
    assert detector.wait(30) == 0
    assert negcase(settings, "health", "--kind", "detector").returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["publish", "--symbol", "X"], "give --side, --entry, --exit"),
        (["publish", "--file", "/nonexistent.jsonl"], "no such file"),
    ],
)
def test_mistakes_get_one_clear_line_and_exit_2(settings, args, message):
    result = negcase(settings, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_redis_is_a_clear_error(settings):
    result = subprocess.run(
        [sys.executable, "-m", "negcase", "status", "--redis-url", "redis://127.0.0.1:1/0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("5", "--partitions 5: no partition 5; NEGCASE_PARTITIONS=3 has partitions 0 to 2"),
        ("0,3", "--partitions 0,3: no partition 3; NEGCASE_PARTITIONS=3 has partitions 0 to 2"),
        (
            "",
            "--partitions is empty: give partition numbers; NEGCASE_PARTITIONS=3 has "
            "partitions 0 to 2",
        ),
        (
            "1,x",
            "--partitions 1,x: 'x' is not a partition number; NEGCASE_PARTITIONS=3 has "
            "partitions 0 to 2",
        ),
    ],
)
def test_a_bad_partitions_flag_is_reported_before_redis_is_reached(settings, given, message):
    # given no Redis at the URL: a check after connecting would say "cannot reach Redis"
    result = negcase(
        settings,
        "detect",
        "--burst",
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--partitions",
        given,
        NEGCASE_PARTITIONS="3",
    )
    assert result.returncode == 2
    # one line, the problem itself: no startup line, no "cannot reach Redis", no traceback
    assert result.stderr.splitlines() == [f"negcase detect: {message}"], result.stderr


def test_a_worker_serves_prometheus_metrics(settings, spawn, client):
    # given a detector with --metrics-port, and trades for it
    port = free_port()
    spawn("detect", "--block-ms", "100", "--metrics-port", str(port))
    negcase(settings, "publish", "--symbol", "X", "--side", "BUY", "--entry", "2", "--exit", "1")

    def entries_counted() -> float:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            return 0.0
        for line in text.decode().splitlines():
            if line.startswith("negcase_detector_entries_total "):
                return float(line.split()[1])
        return 0.0

    # then its counters are on /metrics
    wait_until(lambda: entries_counted() >= 1, what="the detector's metrics")


def test_version_says_which_negcase_this_is(settings):
    result = negcase(settings, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"negcase {negcase_version}"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every `negcase` subcommand's parser by name, `bench` targets as `bench <target>`."""
    found = {}
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        if name == "bench":
            for target, sub in parser._subparsers._group_actions[0].choices.items():
                found[f"bench {target}"] = sub
        else:
            found[name] = parser
    return found


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_command_that_reads_prints_json_on_request():
    readers = (
        "status",
        "health",
        "tail",
        "case",
        "checkpoints",
        "config",
        "predict",
        "prune",
        "demo",
        "bench ingest",
        "bench train",
        "bench serve",
    )
    commands = subcommands()
    assert [name for name in readers if "--json" not in flags_of(commands[name])] == []


def test_one_flag_name_per_concept_and_only_the_flags_a_command_uses():
    commands = subcommands()
    # the size of what one read or claim takes is --batch-size everywhere; a worker's name
    # is --consumer everywhere
    for name in ("detect", "train", "serve"):
        assert {"--batch-size", "--consumer"} <= flags_of(commands[name]), name
    assert all({"--batch", "--name"}.isdisjoint(flags_of(p)) for p in commands.values())
    # --data-dir only where the archive is read or written
    with_archive = {name for name, p in commands.items() if "--data-dir" in flags_of(p)}
    assert with_archive == {
        "detect",
        "train",
        "case",
        "checkpoints",
        "rollback",
        "predict",
        "bootstrap",
        "demo",
        "config",
        "bench ingest",
        "bench train",
    }


def test_cheap_commands_never_import_torch(settings, client):
    # given a case, so that tail and case have something to print
    publish_loss(settings, "t1")
    assert negcase(settings, "detect", "--burst").returncode == 0
    for args in (
        ["--help"],
        ["status"],
        ["health"],
        ["tail", "--last", "1", "--count", "1"],
        ["case", "t1"],
    ):
        # when the command runs with Python's import timing on
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "negcase", *args],
            cwd=ROOT,
            env=worker_env(settings),
            capture_output=True,
            text=True,
            timeout=120,
        )
        # then it did its job and torch (or numpy) was never imported
        assert result.returncode in (0, 1), (args, result.stderr[-2000:])
        imported = {
            line.rsplit("|", 1)[-1].strip()
            for line in result.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert {"torch", "numpy"}.isdisjoint(imported), args


def test_tail_json_prints_numbers_as_numbers(settings, client):
    publish_loss(settings, "t1", "--model-version", "3", "--rule-side", "sell")
    negcase(settings, "detect", "--burst")
    # (the engine's rule, which sold, made the 1 % that v3's BUY lost)
    assert client.hmget(settings.keys.stats, ["model:3:rule_n", "model:3:rule_sum"]) == [
        b"1",
        b"1",
    ]
    tail = negcase(settings, "tail", "--type", "case_added", "--count", "1", "--json")
    event = json.loads(tail.stdout)
    assert event["priority"] == 1 and event["model_version"] == 3 and event["trainable"] == 0
    assert event["loss_pct"] == pytest.approx(1.0) and event["loss_amount"] == pytest.approx(30)
    assert event["trade_id"] == "t1" and isinstance(event["at_ms"], int)
    # and every field typed as a number is one the catalogue documents
    assert {f for t in CATALOGUE.values() for f in t.fields} >= NUMBER_FIELDS


def test_status_text_shows_the_rate_that_json_shows(settings, client):
    # given one trade in the last complete 10 s window: 1/60 trades a second
    keys = settings.keys
    client.hset(keys.rate_bucket(rate_bucket_s(time.time()) - RATE_BUCKET_S), "trades", 1)
    status = json.loads(negcase(settings, "status", "--json").stdout)
    assert status["rates_per_s"]["trades"] == 0.02
    assert "0.02 trades/s" in negcase(settings, "status").stdout


def test_rollback_to_the_latest_version_changes_and_announces_nothing(settings, client):
    registry = CheckpointRegistry(client, settings.keys)
    weights = safetensors.numpy.save({"w": np.zeros(2, np.float32)})  # not read by rollback
    version = registry.publish(weights, hashlib.sha256(weights).hexdigest(), {"trainer": "t"}, None)
    result = negcase(settings, "rollback", str(version))
    assert result.returncode == 0 and "already" in result.stdout
    assert client.xlen(settings.keys.checkpoints) == 1  # the publish only
    assert not any(f[b"type"] == b"rollback" for _, f in client.xrange(settings.keys.events))


def test_a_dead_letter_names_its_trade_in_every_encoding(settings, client):
    bad = json.dumps(
        {"trade_id": "t9", "symbol": "X", "side": "BUY", "entry_price": -1, "exit_price": 1}
    )
    for encoding in ("json", "msgpack"):
        negcase(settings, "publish", "--file", "-", "--encoding", encoding, input_text=bad)
    negcase(settings, "detect", "--burst")
    tail = negcase(settings, "tail", "--type", "dead_lettered", "--count", "2")
    assert tail.stdout.count("| trade t9 |") == 2, tail.stdout


def test_a_misspelled_setting_is_an_error_that_names_the_right_one(settings):
    result = negcase(settings, "status", NEGCASE_FEATURES_COUNT="4")
    assert result.returncode == 2
    assert "NEGCASE_FEATURES_COUNT" in result.stderr
    assert "did you mean NEGCASE_FEATURE_COUNT?" in result.stderr


def test_config_says_what_each_setting_is_and_where_it_came_from(settings):
    url = "redis://alice:s3cret@127.0.0.1:1/0"
    result = negcase(
        settings,
        "config",
        "--json",
        "--namespace",
        "ops",
        NEGCASE_BATCH_SIZE="50",
        NEGCASE_REDIS_URL=url,
    )
    config = json.loads(result.stdout)
    assert config["batch_size"] == {"value": 50, "source": "env", "variable": "NEGCASE_BATCH_SIZE"}
    assert config["namespace"]["value"] == "ops" and config["namespace"]["source"] == "flag"
    assert config["lease_s"] == {"value": 30.0, "source": "default", "variable": "NEGCASE_LEASE_S"}
    assert config["hidden_sizes"]["value"] == [64, 64]
    assert config["redis_url"]["value"] == "redis://alice:***@127.0.0.1:1/0"
    assert "s3cret" not in result.stdout


def test_a_unix_socket_url_works(settings, tmp_path):
    # given a redis-server that listens on a unix socket only
    socket_path = tmp_path / "redis.sock"
    options = f"--port 0 --unixsocket {socket_path} --dir {tmp_path} --appendonly no".split()
    server = subprocess.Popen(
        [redis_server_binary(), *options, "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(socket_path.exists, 30, "the unix socket")
        # when a command is pointed at it
        result = negcase(settings, "status", "--json", NEGCASE_REDIS_URL=f"unix://{socket_path}")
        # then it works like any other URL
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["namespace"] == settings.namespace
    finally:
        server.terminate()
        server.wait(30)


def test_negcase_redis_refuses_a_port_another_server_holds(settings, redis_server, tmp_path):
    # given the test Redis on its port, when `negcase redis` is asked for the same port
    result = negcase(settings, "redis", "--port", str(redis_server.port), "--dir", str(tmp_path))
    # then it says so and fails, instead of printing the other server's URL as its own
    assert result.returncode == 2
    assert f"port {redis_server.port} is taken" in result.stderr and "a Redis" in result.stderr
    assert "export NEGCASE_REDIS_URL" not in result.stdout


def test_checkpoints_and_health_print_json(settings, client):
    registry = CheckpointRegistry(client, settings.keys)
    weights = safetensors.numpy.save({"w": np.ones(2, np.float32)})  # listed, never loaded
    registry.publish(
        weights, hashlib.sha256(weights).hexdigest(), {"trainer": "t", "case_ids": ["nc-1"]}, None
    )
    listing = json.loads(negcase(settings, "checkpoints", "--json").stdout)
    assert listing["latest"] == 1
    assert listing["checkpoints"][0]["version"] == 1 and listing["checkpoints"][0]["latest"]
    health = negcase(settings, "health", "--json")
    assert health.returncode == 1 and json.loads(health.stdout) == {"healthy": False, "workers": []}


def test_a_pinned_version_answers_and_checkpoints_say_which_still_load(settings, client):
    # given two archived versions: the first only on disk now, the second damaged in Redis
    registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir), keep=1)
    for seed in (1, 2):
        weights = weights_bytes(state_of(seeded_model(settings, seed)))
        registry.publish(
            weights, sha256_hex(weights), checkpoint_meta(settings), registry.latest_version()
        )
    client.hset(settings.keys.checkpoint(2), "weights", b"garbage")
    # when the checkpoints are listed, then each says whether it can be loaded, and why not
    listing = negcase(settings, "checkpoints")
    assert listing.returncode == 0, listing.stderr
    # (columns: mark, version, parent, created, cases, metrics, where, load, serving, trainer;
    # before any serving step, latest is in service)
    rows = [line[1:].split() for line in listing.stdout.splitlines()[1:3]]
    assert [(row[0], row[-4], row[-3], row[-2]) for row in rows] == [
        ("1", "disk", "yes", "-"),
        ("2", "redis", "no", "service"),
    ]
    assert "v2 cannot be loaded: v2: sha256 does not match the weights" in listing.stdout
    as_json = json.loads(negcase(settings, "checkpoints", "--json").stdout)["checkpoints"]
    assert [(row["loadable"], row["refused"]) for row in as_json] == [
        (True, None),
        (False, "v2: sha256 does not match the weights"),
    ]
    # and a pinned prediction answers with the version asked for, or says why it cannot
    features = "[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8]"
    pinned = negcase(settings, "predict", "--version", "1", "--features", features, "--json")
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["model_version"] == 1
    refused = negcase(settings, "predict", "--version", "2", "--features", features)
    assert refused.returncode == 2 and "--version 2: cannot be loaded" in refused.stderr
