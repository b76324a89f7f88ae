"""`negcase backtest` on real bars, as a user runs it: the real pipeline over the train part,
the verdict on the held-out part, reproducible with one trainer and a seed."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from negcase.cli.backtest import first_checkpoint_after
from negcase.cli.main import main
from negcase.cli.options import CommandError
from negcase.runtime.settings import Settings
from negcase.schemas.case import NegativeCase
from negcase.sim.bars import read_bars
from negcase.sim.bench_learn import (
    market_file,
    run_bench_learn,
    seeds_of,
    summary_lines,
    write_derived_bars,
)
from negcase.sim.progress import ProgressLine
from tests.conftest import ROOT
from tests.market_data import sp500_csv

pytestmark = pytest.mark.slow

ROWS = [
    "control rule",
    "first checkpoint",
    "latest checkpoint",
    "served policy",
    "offline model",
    "always BUY",
]


def backtest_env() -> dict[str, str]:
    """The user's environment without NEGCASE_* settings, and short training sessions (a
    tenth of the epochs) so a slice runs in seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEGCASE_")}
    return {**env, "NEGCASE_EPOCH_MULTIPLIER": "0.1"}


def backtest(*args: str | Path, **settings: str) -> subprocess.Popen[str]:
    """Start `negcase backtest` with NEGCASE_<NAME> settings on top of backtest_env()."""
    env = {**backtest_env(), **{f"NEGCASE_{name.upper()}": v for name, v in settings.items()}}
    return subprocess.Popen(
        [sys.executable, "-m", "negcase", "backtest", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen[str]) -> str:
    """The stdout of a backtest that exited 0."""
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def test_the_real_loop_learns_on_the_train_part_and_is_judged_on_the_held_out_part(
    tmp_path, client, redis_url
):
    # given 300 real daily S&P 500 bars, and a live deployment's keys on the same Redis
    bars = tmp_path / "sp500.csv"
    bars.write_text(sp500_csv(300))
    client.set("negcase:ckpt:latest", "7")
    # when the backtest runs there, keeping its archive and drawing its equity curves
    archive, plot, history = tmp_path / "archive", tmp_path / "equity.png", tmp_path / "t.jsonl"
    options = ("--archive", archive, "--plot", plot, "--trades-out", history)
    run = backtest("--bars", bars, "--json", "--redis-url", redis_url, *options)
    report = json.loads(finished(run))

    # then the five policies are judged on the same held-out decisions
    held = report["held_out"]
    rows = held["rows"]
    assert [row["policy"] for row in rows] == ROWS
    assert {row["decisions"] for row in rows} == {held["decisions"]} and held["decisions"] >= 15
    control, first, latest, served, offline, always_buy = rows
    assert (always_buy["trades"], always_buy["hold_share"]) == (held["decisions"], 0)
    assert control["loss_rate_vs_control_95"] is None
    for row in (first, latest, served, offline, always_buy):
        low, high = row["loss_rate_vs_control_95"]
        assert -1 <= low <= high <= 1
        difference = row["loss_rate"] - control["loss_rate"]
        assert row["loss_rate_vs_control"] == pytest.approx(difference, abs=1e-5)
    # and the latest checkpoint is set beside the first and the offline model, paired
    against = held["latest_against"]
    for other in (first, offline):
        paired = against[other["policy"]]
        difference = latest["loss_rate"] - other["loss_rate"]
        assert paired["difference"] == pytest.approx(difference, abs=1e-5)
        low, high = paired["interval_95"]
        assert -1 <= low <= high <= 1
    # and the served policy is the live logic carried on: each decision answered by the
    # version serving named (or the control rule), starting from what served at the end
    served_report = report["served"]
    assert served_report["decisions"] == held["decisions"] == served["decisions"]
    assert sum(served_report["answered_by"].values()) == held["decisions"]
    assert served_report["in_service_first"] is not None
    # and a slice's few dozen train decisions are not kept from a model by the 200 outcomes a
    # deployment waits for: the first checkpoint comes after a third of them, 20 at least
    assert report["options"]["first_checkpoint_after_outcomes"] == 20
    assert report["options"]["canary"] == {
        "share": 0.5,
        "min_outcomes": 30,
        "live_window": 100,
        "auto_rollback": True,
    }
    # and the checkpoints judged are the first and the latest that training published
    training = report["training"]
    assert training["checkpoints_published"] == training["sessions"]["published"] >= 2
    assert (first["version"], latest["version"]) == (1, training["latest_checkpoint"])
    # and what the live logic decided during the train walk is counted
    assert training["serving_changes"]["promoted"] >= 1

    # every losing trade of the train part became a case, through the real detector
    train = report["train_part"]
    assert report["cases"]["total"] == train["losses"] > 0
    cases = [NegativeCase.from_msgpack(p.read_bytes()) for p in (archive / "cases").iterdir()]
    assert len(cases) == train["losses"]
    # the engine asked the model once one existed, and put the replying version on the
    # trade, opinion or not (with none, or from a version that defers to the rule, the
    # engine kept its rule)
    assert train["by_control"] > 0
    assert any(case.model_version for case in cases)
    by_model = [case for case in cases if case.extra["decided_by"] == "model"]
    assert all(case.model_version for case in by_model)
    assert all(len(case.features) == 8 for case in cases)
    # nothing of the held-out part reached the pipeline
    held_out_from_ms = datetime.fromisoformat(held["from"]).replace(tzinfo=UTC).timestamp() * 1000
    assert max(case.closed_at_ms for case in cases) < held_out_from_ms
    # the pipeline kept up, and every worker stopped cleanly
    run = report["run"]
    assert (run["pipeline_late"], run["failed_signal_requests"]) == (0, 0)
    assert run["trades_out_error"] is None
    assert set(run["worker_exit_codes"].values()) == {0}
    # the run's namespace is gone and the live keys are untouched
    assert client.get("negcase:ckpt:latest") == b"7"
    assert [key for key in client.scan_iter() if key != b"negcase:ckpt:latest"] == []
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # and the train part's trades and skips, written out, start a new deployment's first model
    assert len(history.read_text().splitlines()) == train["decisions"]
    fresh = ("--redis-url", redis_url, "--namespace", "fresh", "--data-dir", tmp_path / "fresh")
    boot = subprocess.run(
        [sys.executable, "-m", "negcase", "bootstrap", "--trades", history, "--json", *fresh],
        env=backtest_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert boot.returncode == 0, boot.stderr
    assert json.loads(boot.stdout)["version"] == 1
    assert client.get("fresh:ckpt:latest") == b"1"


def test_one_trainer_and_one_seed_print_the_same_table_twice(tmp_path):
    # given a slice of real bars
    bars = tmp_path / "sp500.csv"
    bars.write_text(sp500_csv(300, start=1000))
    # when two runs with one trainer and the same seed go side by side, each on its own Redis
    # (every session draws seeded replay batches from the outcomes: the draws matter)
    runs = [backtest("--bars", bars, "--trainers", "1", "--seed", "5") for _ in range(2)]
    first, second = (finished(run) for run in runs)
    # then they print the same table, to the last digit, after learning something
    assert first == second
    assert "latest    loss rate against the first checkpoint " in first
    latest = re.search(r"^latest checkpoint v(\d+) ", first, re.MULTILINE)
    assert latest and int(latest[1]) >= 2, first


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (
            "Date,Open,High,Low,Close,Volume\n1/4/1999,1,2,1,2,5\n1/5/1999,1,2,1,x,5\n",
            [],
            "line 3, column 'Close': 'x' is not a number",
        ),
        (sp500_csv(70), [], "the train part has no decision"),
        (sp500_csv(300), ["--features", "tests.no_such_module:f"], "cannot import"),
        (sp500_csv(300), ["--train-share", "1.5"], "--train-share: must be between 0 and 1"),
        (sp500_csv(300), ["--trades-out", "/"], "--trades-out: / is a folder"),
        (sp500_csv(300), ["--trades-out", "/no/such/t.jsonl"], "/no/such is not a folder"),
    ],
)
def test_input_it_cannot_use_is_one_clear_line_before_anything_starts(
    tmp_path, capsys, content, extra, message
):
    bars = tmp_path / "bars.csv"
    bars.write_text(content)
    status = main(["backtest", "--bars", str(bars), "--archive", str(tmp_path / "kept"), *extra])
    assert status == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "kept").exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    ("decisions", "environment", "expected"),
    [(900, {}, 200), (300, {}, 100), (30, {}, 20), (300, {"NEGCASE_MIN_OUTCOMES": "250"}, 250)],
)
def test_a_backtest_waits_for_a_third_of_its_train_decisions_at_most_and_20_at_least(
    monkeypatch, decisions, environment, expected
):
    # given a train part of `decisions` decisions, and NEGCASE_MIN_OUTCOMES set or not
    monkeypatch.delenv("NEGCASE_MIN_OUTCOMES", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    market = SimpleNamespace(plan=SimpleNamespace(train=range(decisions)))
    # then the first checkpoint waits for the setting, capped at a third unless it is set
    assert first_checkpoint_after(market, settings) == expected


def test_an_archive_folder_that_holds_something_is_refused(tmp_path, capsys):
    bars = tmp_path / "bars.csv"
    bars.write_text(sp500_csv(300))
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "v1.json").write_text("{}")
    assert main(["backtest", "--bars", str(bars), "--archive", str(tmp_path / "kept")]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_bench_learn_reads_arch_files_and_derives_bars_for_a_price_only_series(tmp_path):
    # given the S&P 500 file as arch ships it, it is read as it is
    assert len(read_bars(market_file("sp500", tmp_path))) == 5031
    # when WTI's daily prices become bars
    wti = read_bars(market_file("wti", tmp_path))
    # then each bar opens at the close before it, and its range spans open and close
    assert len(wti) > 8000 and wti.open[0] == wti.close[0]
    assert (wti.open[1:] == wti.close[:-1]).all()
    assert (wti.high >= wti.open).all() and (wti.high >= wti.close).all()
    assert (wti.low <= wti.open).all() and (wti.low <= wti.close).all()
    # and a series written that way reads back exactly
    path = tmp_path / "derived.csv"
    write_derived_bars(path, ["2020-01-02", "2020-01-03"], [10.0, 9.5])
    derived = read_bars(path)
    assert derived.open.tolist() == [10.0, 10.0] and derived.low.tolist() == [10.0, 9.5]


def learn_report(symbol: str, seed: int, control: float, first: float, latest: float) -> dict:
    """The parts of a backtest report the bench's summary reads, with these loss rates."""
    rates = {"control rule": control, "first checkpoint": first, "latest checkpoint": latest}
    rows = [
        {
            "policy": name,
            "loss_rate": rate,
            "loss_rate_vs_control": round(rate - control, 6),
            "loss_rate_vs_control_95": [-0.05, 0.04],
        }
        for name, rate in rates.items()
    ]
    paired = {"difference": latest - first, "interval_95": [-0.1, 0.02]}
    return {
        "market": {"symbol": symbol},
        "options": {"seed": seed},
        "held_out": {
            "rows": rows,
            "latest_against": {"first checkpoint": paired, "offline model": None},
        },
    }


def test_the_bench_summary_judges_each_run_against_the_learning_bar():
    # given runs below first and control, equal to control, below control but not below
    # first, equal to first, above control, and one that published nothing
    unpublished = learn_report("wti", 2, control=0.47, first=0.5, latest=0.5)
    unpublished["held_out"]["rows"][2]["loss_rate"] = None
    reports = [
        learn_report("sp500", 0, control=0.475, first=0.6, latest=0.455),
        learn_report("wti", 0, control=0.47, first=0.55, latest=0.51),  # above control
        learn_report("sp500", 1, control=0.475, first=0.6, latest=0.475),
        learn_report("sp500", 2, control=0.5, first=0.4, latest=0.45),
        learn_report("sp500", 3, control=0.5, first=0.45, latest=0.45),
        unpublished,
    ]
    # when the summary is made
    lines = summary_lines(reports)
    # then each run has its line, market by market, with its figures and whether it met the bar
    assert (
        "sp500    seed 0   vs control -2.0 [-5.0, +4.0], vs first -14.5 [-10.0, +2.0]" in lines[1]
    )
    assert lines[1].endswith("vs offline n/a  bar met")
    assert lines[2].endswith("bar met")  # not above the control rule: equal is enough
    assert "seed 2" in lines[3] and "bar met" not in lines[3]  # not below the first
    assert "seed 3" in lines[4] and "bar met" not in lines[4]  # equal to the first
    assert "wti      seed 0   vs control +4.0" in lines[5] and "bar met" not in lines[5]
    assert "wti      seed 2   not judged" in lines[6]
    # and each market its count (a run not judged did not meet it) and mean
    assert lines[7] == "  sp500    bar met in 2 of 4 runs; mean vs control -3.0 points"
    assert lines[8] == "  wti      bar met in 0 of 2 runs; mean vs control +4.0 points"


def test_bench_seeds_are_a_list_of_seeds_and_ranges():
    assert seeds_of("0-3") == [0, 1, 2, 3]
    assert seeds_of("5, 0-1,1") == [5, 0, 1]
    for bad, reason in [
        ("3-1", "ends before it starts"),
        ("-1", "is not a seed"),
        ("a", "is not a seed"),
        ("", "is not a seed"),
        ("0,,1", "is not a seed"),
        ("0-100", "more than 100 seeds"),
    ]:
        with pytest.raises(CommandError, match=f"--seeds: .*{reason}"):
            seeds_of(bad)
    both = SimpleNamespace(markets=None, seeds="0-1", seed=3)
    with pytest.raises(CommandError, match="--seed and --seeds: give one of them"):
        run_bench_learn(both)


def test_progress_is_one_line_redrawn_on_a_terminal_and_plain_lines_otherwise():
    # given a walk of 200 bars reported to a log file
    plain = io.StringIO()
    progress = ProgressLine(200, plain, redraw=False)
    for done in range(1, 201):
        progress(done, done // 2, 3 if done > 50 else None)
    # then it gets a plain line every tenth of the way
    lines = plain.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("backtest: train bars 20/200 (10%), 10 trades, checkpoint none yet")
    assert lines[-1].startswith("backtest: train bars 200/200 (100%), 100 trades, checkpoint v3")
    # and on a terminal, one line redrawn in place, ended once the walk is done
    terminal = io.StringIO()
    progress = ProgressLine(200, terminal, redraw=True)
    for done in range(1, 201):
        progress(done, 0, None)
    text = terminal.getvalue()
    assert text.startswith("\r\x1b[K") and text.endswith(" left\n") and text.count("\n") == 1
    assert "200/200" in text.rsplit("\r", 1)[-1]
