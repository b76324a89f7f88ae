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
from negcase.sim.verdict import CONTROL, FIRST, LATEST, OFFLINE, render_report

MARKETS = ("sp500", "nasdaq", "wti")


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
    """Run the backtest on each market, one after the other, and print each table."""
    chosen = args.markets or ",".join(MARKETS)
    markets = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = sorted(set(markets) - set(MARKETS))
    if unknown or not markets:
        raise CommandError(f"--markets: unknown {unknown}; choose from {', '.join(MARKETS)}")
    settings = base_settings(args)
    seeds = (
        seeds_of(args.seeds) if args.seeds else [settings.seed if args.seed is None else args.seed]
    )
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
    """The seeds --seeds names: a comma-separated list of integers or ranges ("0-3,7")."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise CommandError(f"--seeds: {part!r} is not a seed or a range like 0-3") from None
        if first < 0 or last < first:
            raise CommandError(f"--seeds: {part!r} is not a seed or a range like 0-3")
        seeds += [seed for seed in range(first, last + 1) if seed not in seeds]
    return seeds


@dataclass(frozen=True, slots=True)
class RunVerdict:
    """One run against the learning bar: the latest checkpoint's loss rate minus the control
    rule's (a share, and as text with its interval), minus the first checkpoint's and the
    offline model's (as text), and whether the run meets the bar."""

    difference: float
    against_control: str
    against_first: str
    against_offline: str
    met: bool


def run_verdict(report: dict[str, Any]) -> RunVerdict | None:
    """One run's verdict, or None when a row it needs made no trade (or nothing was
    published)."""
    rows = {row["policy"]: row for row in report["held_out"]["rows"]}
    latest, first, control = (rows[name]["loss_rate"] for name in (LATEST, FIRST, CONTROL))
    if latest is None or first is None or control is None:
        return None
    against = report["held_out"]["latest_against"]
    return RunVerdict(
        difference=latest - control,
        against_control=_with_interval(latest - control, rows[LATEST]["loss_rate_vs_control_95"]),
        against_first=_paired_text(against[FIRST]),
        against_offline=_paired_text(against[OFFLINE]),
        met=latest < first and latest <= control,
    )


def summary_lines(reports: list[dict[str, Any]]) -> list[str]:
    """One line per run (its verdict), then per market how many runs met the bar and the
    mean difference from the control rule."""
    lines = [
        "summary: the latest checkpoint's loss rate minus each row's, in points [95 % "
        "interval]; the bar: below the first checkpoint's and not above the control rule's",
    ]
    by_market: dict[str, list[RunVerdict]] = {}
    for report in reports:
        verdict = run_verdict(report)
        name = f"{report['market']['symbol']:<8} seed {report['options']['seed']:<3}"
        if verdict is None:
            lines.append(f"  {name} a row made no trade (or nothing was published): not judged")
            continue
        lines.append(
            f"  {name} vs control {verdict.against_control}, vs first {verdict.against_first}, "
            f"vs offline {verdict.against_offline}{'  bar met' if verdict.met else ''}"
        )
        by_market.setdefault(report["market"]["symbol"], []).append(verdict)
    for symbol, verdicts in by_market.items():
        mean = sum(v.difference for v in verdicts) / len(verdicts)
        lines.append(
            f"  {symbol:<8} bar met in {sum(v.met for v in verdicts)} of {len(verdicts)} "
            f"runs; mean vs control {mean * 100:+.1f} points"
        )
    return lines


def _paired_text(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return "n/a"
    return _with_interval(paired["difference"], paired["interval_95"])


def _with_interval(difference: float, interval: list[float] | None) -> str:
    text = f"{difference * 100:+.1f}"
    if interval is not None:
        text += f" [{interval[0] * 100:+.1f}, {interval[1] * 100:+.1f}]"
    return text
