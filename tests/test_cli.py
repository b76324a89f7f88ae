"""The negcase command as people use it: real processes against the test Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from negcase.cli.main import build_parser
from negcase.store.local_redis import free_port
from tests.conftest import ROOT, wait_until, worker_env


def negcase(settings, *args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "negcase", *args],
        cwd=ROOT,
        env=worker_env(settings),
        input=input_text,
        capture_output=True,
        text=True,
        timeout=120,
    )


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
