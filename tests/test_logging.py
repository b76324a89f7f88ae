"""Diagnostics: timestamped, levelled log lines (text or JSON) from every worker, a startup
line that says how the worker was configured without its password, and progress at INFO."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from negcase.client.trades import publish_trades
from negcase.runtime.logging import Progress, configure_logging, log_startup
from negcase.runtime.settings import Settings
from tests.conftest import ROOT, worker_env

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG) +\S+: ")


@pytest.fixture(autouse=True)
def restored_logging() -> Iterator[None]:
    """Put the `negcase` logger back as it was: its handlers here write to a captured
    stderr that is closed after the test."""
    root = logging.getLogger("negcase")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_a_text_line_has_a_time_a_level_and_the_logger(capsys):
    configure_logging("INFO", "text")
    logging.getLogger("negcase.test").info("batch of %d entries", 3)
    logging.getLogger("negcase.test").debug("not shown at INFO")
    [line] = capsys.readouterr().err.splitlines()
    assert TEXT_LINE.match(line) and line.endswith("negcase.test: batch of 3 entries")


def test_a_json_line_is_one_object_with_its_extra_fields(capsys):
    configure_logging("debug", "json")
    logging.getLogger("negcase.test").warning("Redis unreachable", extra={"retry_s": 0.4})
    entry = json.loads(capsys.readouterr().err)
    assert entry["level"] == "WARNING" and entry["logger"] == "negcase.test"
    assert entry["message"] == "Redis unreachable" and entry["retry_s"] == 0.4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])


def test_the_startup_line_hides_the_password_and_names_what_is_not_default(capsys):
    configure_logging("INFO", "text")
    settings = Settings(
        redis_url="redis://ops:s3cret@redis:6379/0",
        namespace="prod",
        batch_size=50,
        hidden_sizes=(32, 16),
    )
    log_startup(logging.getLogger("negcase.test"), "detector", settings, "d1", "detectors")
    line = capsys.readouterr().err
    assert "s3cret" not in line and "redis://ops:***@redis:6379/0" in line
    assert "detector d1 starting" in line and "namespace prod, group detectors" in line
    assert "batch_size=50, hidden_sizes=32,16" in line and "lease_s" not in line


def test_progress_says_what_was_done_at_most_once_per_interval(capsys):
    configure_logging("INFO", "text")
    progress = Progress(logging.getLogger("negcase.test"), "stored", every_s=3600)
    progress.add({"entries": 5, "cases": 1})  # the first batch after a quiet spell: said at once
    progress.add({"entries": 7, "cases": 0})  # within the interval: counted, not said
    progress.add({"entries": 1, "cases": 1})
    progress.flush()  # on stop: what is left
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "stored: 5 entries, 1 cases",
        "stored: 8 entries, 1 cases",
    ]


def test_a_detector_logs_its_start_its_work_and_its_stop(client, settings):
    # given two trades, one of them a loss, and a detector with a setting changed
    trades = [
        {"trade_id": "t1", "symbol": "X", "side": "BUY", "entry_price": 2, "exit_price": 1},
        {"trade_id": "t2", "symbol": "X", "side": "BUY", "entry_price": 1, "exit_price": 2},
    ]
    publish_trades(client, settings.keys, trades, "flat")
    env = worker_env(settings, NEGCASE_CLAIM_IDLE_MS="5000")
    # when it drains the stream with JSON logs
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "negcase",
            "detect",
            "--burst",
            "--consumer",
            "d1",
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # then every line on stderr is a JSON log entry: start, work, leaving the group, stop
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    messages = [entry["message"] for entry in entries]
    start = entries[0]
    assert start["level"] == "INFO" and start["namespace"] == settings.namespace
    assert start["group"] == "detectors" and start["worker"] == "d1"
    assert "claim_idle_ms=5000" in start["message"]
    assert any(m.startswith("stored: 2 entries, 1 cases added") for m in messages), messages
    assert "d1 left group detectors" in messages
    assert messages[-1].startswith("detector d1 stopped: 2 entries, 1 cases added")
    assert result.stdout == ""


def test_worker_code_writes_no_diagnostics_with_print():
    # print stays for command output (the CLI); workers, runtime and store use logging
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("workers/processes", "workers/runtime", "workers/client", "store")
        for path in (ROOT / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\bprint\(", line)
    ]
    assert offenders == []
