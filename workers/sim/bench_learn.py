"""`negcase bench learn`: the backtest on three real daily markets that the `arch` package
ships (S&P 500 and NASDAQ 1999-2018, WTI crude 1986-2019), one table each with its run time,
for one seed or several (--seeds), closed by a summary of every run against the learning
bar: the yardstick every change to learning is judged with."""

from __future__ import annotations

import argparse
import csv
import importlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from negcase.cli.backtest import backtest, base_settings, config_from
from negcase.cli.options import CommandError
from negcase.sim.progress import clock
from negcase.sim.verdict import CONTROL, FIRST, LATEST, OFFLINE, difference_text, render_report

MARKETS = ("sp500", "nasdaq", "wti")
# Each run takes minutes: more seeds than this is a typo, not a plan.
MAX_SEEDS = 100


def market_file(name: str, folder: Path) -> Path:
    """A bars file `negcase backtest` reads, for one of MARKETS. The S&P 500 and NASDAQ
    files are read as arch ships them. WTI is a daily spot price only (FRED DCOILWTICO), so
    its bars are derived: open = the previous close (the first bar opens at its close),
    high = max(open, close), low = min(open, close), volume 0; days without a price are left
    out. A position then opens at the last known price, and the range features see the
    close-to-close move."""
    try:
        module = importlib.import_module(f"arch.data.{name}")
    except ImportError:
        raise CommandError(
            "bench learn reads its data from the arch package: pip install arch"
        ) from None
    if name != "wti":
        return Path(module.__file__).with_name(f"{name}.csv.gz")
    prices = module.load()["DCOILWTICO"].dropna()
    path = folder / "wti.csv"
    write_derived_bars(path, [day.strftime("%Y-%m-%d") for day in prices.index], prices.tolist())
    return path


def write_derived_bars(path: Path, dates: list[str], closes: list[float]) -> None:
    """Write a price-only series as OHLCV bars (see market_file)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Date", "Open", "High", "Low", "Close", "Volume"])
        previous = closes[0]
        for date, close in zip(dates, closes, strict=True):
            writer.writerow([date, previous, max(previous, close), min(previous, close), close, 0])
            previous = close


def run_bench_learn(args: argparse.Namespace) -> int:
    """Run the backtest on each market with each seed, one after the other, and print each
    run's table, then the summary against the learning bar (or every report as JSON)."""
    chosen = args.markets or ",".join(MARKETS)
    markets = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = sorted(set(markets) - set(MARKETS))
    if unknown or not markets:
        raise CommandError(f"--markets: unknown {unknown}; choose from {', '.join(MARKETS)}")
    if args.seeds is not None and args.seed is not None:
        raise CommandError("--seed and --seeds: give one of them")
    settings = base_settings(args)
    if args.seeds is not None:
        seeds = seeds_of(args.seeds)
    else:
        seeds = [settings.seed if args.seed is None else args.seed]
    reports: list[dict[str, Any]] = []
    clean = True
    with tempfile.TemporaryDirectory(prefix="negcase-bench-learn-") as folder:
        for seed in seeds:
            for name in markets:
                started_s = time.monotonic()
                config = config_from(args, market_file(name, Path(folder)), name, seed)
                report = backtest(config, settings).report
                seconds = round(time.monotonic() - started_s, 1)
                reports.append(report)
                clean &= set(report["run"]["worker_exit_codes"].values()) <= {0}
                if not args.json:
                    print(f"{render_report(report)}\nrun time {clock(seconds)}\n", flush=True)
    if args.json:
        print(orjson.dumps(reports, option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(summary_lines(reports)))
    return 0 if clean else 1


def seeds_of(text: str) -> list[int]:
    """The seeds --seeds names: a comma-separated list of seeds (0 or more) and ranges
    ("0-3,7"), each once, at most MAX_SEEDS; CommandError names the part it cannot read."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        # A minus sign cannot start a part: "-1" splits into "" and "1", which int() refuses.
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise CommandError(f"--seeds: {part!r} is not a seed or a range like 0-3") from None
        if last < first:
            raise CommandError(f"--seeds: {part!r} ends before it starts")
        if last - first >= MAX_SEEDS:
            raise CommandError(f"--seeds: {part!r} holds more than {MAX_SEEDS} seeds")
        seeds += [seed for seed in range(first, last + 1) if seed not in seeds]
    if len(seeds) > MAX_SEEDS:
        raise CommandError(f"--seeds: {len(seeds)} seeds, at most {MAX_SEEDS}")
    return seeds


@dataclass(frozen=True, slots=True)
class RunVerdict:
    """One run against the learning bar, on point estimates as the bar is stated: the latest
    checkpoint's loss rate minus the control rule's (a share, and as text with its
    interval), minus the first checkpoint's and the offline model's (as text), and whether
    the run meets the bar (below the first, not above the control rule)."""

    difference: float
    against_control: str
    against_first: str
    against_offline: str
    met: bool


def run_verdict(report: dict[str, Any]) -> RunVerdict | None:
    """One run's verdict, or None when nothing was published or a row it needs made no
    trade."""
    rows = {row["policy"]: row for row in report["held_out"]["rows"]}
    latest, first, control = (rows[name]["loss_rate"] for name in (LATEST, FIRST, CONTROL))
    if latest is None or first is None or control is None:
        return None
    against = report["held_out"]["latest_against"]
    difference = rows[LATEST]["loss_rate_vs_control"]
    return RunVerdict(
        difference=difference,
        against_control=difference_text(difference, rows[LATEST]["loss_rate_vs_control_95"]),
        against_first=_paired_text(against[FIRST]),
        against_offline=_paired_text(against[OFFLINE]),
        met=latest < first and latest <= control,
    )


def summary_lines(reports: list[dict[str, Any]]) -> list[str]:
    """One line per run (its verdict), then per market how many runs met the bar (a run
    that cannot be judged did not) and the mean difference from the control rule of those
    that can."""
    lines = [
        "summary: the latest checkpoint's loss rate minus each row's, in points [95 % "
        "interval]; the bar: below the first checkpoint's and not above the control rule's",
    ]
    by_market: dict[str, list[RunVerdict | None]] = {}
    for report in sorted(reports, key=lambda r: r["market"]["symbol"]):
        verdict = run_verdict(report)
        name = f"{report['market']['symbol']:<8} seed {report['options']['seed']:<3}"
        by_market.setdefault(report["market"]["symbol"], []).append(verdict)
        if verdict is None:
            lines.append(f"  {name} not judged: nothing was published, or a row made no trade")
            continue
        lines.append(
            f"  {name} vs control {verdict.against_control}, vs first {verdict.against_first}, "
            f"vs offline {verdict.against_offline}{'  bar met' if verdict.met else ''}"
        )
    for symbol, verdicts in by_market.items():
        judged = [v for v in verdicts if v is not None]
        line = f"  {symbol:<8} bar met in {sum(v.met for v in judged)} of {len(verdicts)} runs"
        if judged:
            mean = sum(v.difference for v in judged) / len(judged)
            line += f"; mean vs control {mean * 100:+.1f} points"
        lines.append(line)
    return lines


def _paired_text(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return "n/a"
    return difference_text(paired["difference"], paired["interval_95"])
