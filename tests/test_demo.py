"""`negcase demo` end to end, as a newcomer runs it: its own Redis, real workers, a summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_demo_learns_from_its_losses_and_stops_everything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEGCASE_")}
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "negcase",
            "demo",
            "--duration",
            "25",
            "--json",
            "--data-dir",
            str(tmp_path / "negative"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = demo.communicate(timeout=240)
    finally:
        if demo.poll() is None:  # took too long: stop it and everything it started
            os.killpg(demo.pid, signal.SIGTERM)
            try:
                demo.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.communicate()
    assert demo.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    # cases at several priorities, training that published, reloads, dead letters
    assert sum(1 for n in summary["cases_by_priority"].values() if n) >= 3
    assert summary["checkpoints_published"] >= 3
    assert summary["reloads"] >= 2
    assert summary["dead_letters"] > 0
    assert summary["signal_requests_failed"] == 0
    # every case is accounted for, and every worker stopped cleanly
    cases = summary["cases"]
    assert cases["queued"] + cases["leased"] + cases["done"] + cases["dead"] == cases["total"]
    assert set(summary["worker_exit_codes"].values()) == {0}
    # the latest model loses less often than the first on the fixed held-out situations
    held_out = summary["loss_rate_held_out"]
    assert held_out["latest"]["loss_rate"] < held_out["first"]["loss_rate"]
    # and the archive is left behind
    assert any((tmp_path / "negative" / "cases").iterdir())
    assert (tmp_path / "negative" / "case_index.json").exists()
