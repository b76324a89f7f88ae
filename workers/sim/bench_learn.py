"""`negcase bench learn`: the backtest on three real daily markets that the `arch` package
ships (S&P 500 and NASDAQ 1999-2018, WTI crude 1986-2019), one table each with its run time:
the yardstick every change to learning is judged with."""

from __future__ import annotations

import argparse
import csv
import importlib
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from negcase.cli.backtest import backtest, base_settings, config_from
from negcase.cli.options import CommandError
from negcase.sim.progress import clock
from negcase.sim.verdict import render_report

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
    seed = settings.seed if args.seed is None else args.seed
    reports: list[dict[str, Any]] = []
    clean = True
    with tempfile.TemporaryDirectory(prefix="negcase-bench-learn-") as folder:
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
    return 0 if clean else 1
