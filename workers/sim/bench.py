"""`negcase bench`: throughput and latency, reported as ratios against raw Redis measured
in the same run (these machines are shared and noisy; absolute figures drift)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from negcase.cli.backtest import walk_options
from negcase.cli.options import (
    archive_options,
    connection_options,
    one_partition,
    settings_from,
)
from negcase.client.trades import encode_trade
from negcase.processes.detector import LossDetector
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.sim.bench_support import FEATURES, bench_redis, drop_namespace, redis_label
from negcase.sim.supervisor import Supervisor
from negcase.store.archive import Archive
from negcase.store.connection import connect
from negcase.store.keys import DETECTOR_GROUP, Keys


def bench_trade(i: int, prefix: str) -> dict[bytes, bytes]:
    """A ~300-byte flat trade event; every other one is a 1 % loss."""
    exit_price = 2970.0 if i % 2 else 3030.0
    trade = {
        "trade_id": f"{prefix}-{i:09d}",
        "symbol": "ETH/USDT",
        "side": "BUY",
        "entry_price": 3000.0,
        "exit_price": exit_price,
        "quantity": 0.5,
        "leverage": 3.0,
        "fee_rate": 0.0004,
        "closed_at": 1795513508000 + i,
        "opened_at": 1795513400000 + i,
        "confidence": 0.62,
        "model_version": 1,
        "features": FEATURES,
        "technical_indicators": {"rsi": 61.2, "macd": -0.41},
    }
    return {
        k.encode(): v if isinstance(v, bytes) else v.encode()
        for k, v in encode_trade(trade, "flat").items()
    }


def fill_stream(client: redis.Redis, keys: Keys, events: list[dict[bytes, bytes]]) -> None:
    """Put the events on the trades stream and create the detectors group (not timed)."""
    pipe = client.pipeline(transaction=False)
    for n, fields in enumerate(events, start=1):
        pipe.xadd(keys.trades, fields)
        if n % 1000 == 0:
            pipe.execute()
    pipe.execute()
    client.xgroup_create(keys.trades, DETECTOR_GROUP, id="0", mkstream=True)


def raw_loop(client: redis.Redis, keys: Keys, batch_size: int) -> int:
    """The baseline: XREADGROUP a batch, XACK it, until the stream is drained."""
    handled = 0
    while True:
        reply = client.xreadgroup(DETECTOR_GROUP, "raw", {keys.trades: ">"}, count=batch_size)
        if not reply:
            return handled
        ids = [entry_id for entry_id, _ in reply[0][1]]
        client.xack(keys.trades, DETECTOR_GROUP, *ids)
        handled += len(ids)


def bench_archive_dir(settings: Settings) -> Path:
    """A scratch archive beside the configured one, so "archive on" is measured on the disk
    the archive really lives on (/tmp can be another filesystem, much faster or slower)."""
    parent = settings.data_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".negcase-bench-", dir=parent))


def timed_throughput(
    client: redis.Redis,
    settings: Settings,
    events: list[dict[bytes, bytes]],
    mode: str,
    scratch: Path,
) -> float:
    """Events/s of one mode ("raw", "archive-off", "archive-on") on a fresh namespace; an
    archive goes in a new folder under `scratch`."""
    namespace = f"bench-{mode}-{time.monotonic_ns()}"
    run_settings = settings.with_overrides(namespace=namespace)
    fill_stream(client, run_settings.keys, events)
    archive_dir = scratch / namespace
    # Start from a quiet disk: what earlier runs (or other programs) left dirty or deleted
    # is flushed now, not billed to this run's syncs.
    os.sync()
    try:
        started = time.perf_counter()
        if mode == "raw":
            handled = raw_loop(client, run_settings.keys, settings.batch_size)
        else:
            archive = Archive(archive_dir) if mode == "archive-on" else None
            detector = LossDetector(client, run_settings, "bench", archive)
            handled = detector.run(StopFlag(), burst=True).entries
        elapsed = time.perf_counter() - started
    finally:
        drop_namespace(client, namespace)
    assert handled == len(events), f"{mode}: handled {handled} of {len(events)}"
    return handled / elapsed


def steady_latency(
    client: redis.Redis,
    settings: Settings,
    rate: float,
    duration_s: float,
    log_dir: Path,
    archive: bool,
) -> dict[str, float]:
    """p50/p99 ms from XADD to the case being in the queue, with a detector process, at a
    steady `rate`. The case_added event is written in the same script as the queue entry,
    so seeing it is seeing the case queued."""
    namespace = f"bench-latency-{time.monotonic_ns()}"
    run_settings = settings.with_overrides(namespace=namespace, data_dir=log_dir / "archive")
    keys = run_settings.keys
    client.xgroup_create(keys.trades, DETECTOR_GROUP, id="0", mkstream=True)
    supervisor = Supervisor(run_settings, log_dir)
    sent_at: dict[bytes, float] = {}
    latencies_ms: list[float] = []
    total = int(rate * duration_s)
    losses = total // 2
    observer = threading.Thread(
        target=_observe_cases,
        args=(
            connect(run_settings.redis_url or ""),
            keys,
            sent_at,
            latencies_ms,
            losses,
            duration_s + 30,
        ),
        daemon=True,
    )
    archive_flag = () if archive else ("--no-archive",)
    supervisor.start(
        "bench-detector", "detect", "--consumer", "bench", "--block-ms", "100", *archive_flag
    )
    try:
        _wait_for_consumer(client, keys)
        observer.start()
        _publish_steadily(client, keys, rate, total, sent_at)
        observer.join()
    finally:
        supervisor.stop_all()
        drop_namespace(client, namespace)
    latencies_ms.sort()
    return {
        "cases": len(latencies_ms),
        "p50_ms": _percentile(latencies_ms, 50),
        "p99_ms": _percentile(latencies_ms, 99),
        "max_ms": latencies_ms[-1] if latencies_ms else float("nan"),
    }


def _wait_for_consumer(client: redis.Redis, keys: Keys, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.xinfo_consumers(keys.trades, DETECTOR_GROUP):
            return
        time.sleep(0.05)
    raise RuntimeError("the bench detector did not start")


def _publish_steadily(
    client: redis.Redis, keys: Keys, rate: float, total: int, sent_at: dict[bytes, float]
) -> None:
    tick_s = 0.01
    per_tick = max(1, round(rate * tick_s))
    next_tick = time.perf_counter()
    i = 0
    while i < total:
        pipe = client.pipeline(transaction=False)
        for _ in range(min(per_tick, total - i)):
            fields = bench_trade(i, "lat")
            pipe.xadd(keys.trades, fields)
            sent_at[fields[b"trade_id"]] = time.time()
            i += 1
        pipe.execute()
        next_tick += tick_s
        time.sleep(max(0.0, next_tick - time.perf_counter()))


def _observe_cases(
    client: redis.Redis,
    keys: Keys,
    sent_at: dict[bytes, float],
    latencies_ms: list[float],
    expected: int,
    timeout_s: float,
) -> None:
    cursor = "$"
    deadline = time.monotonic() + timeout_s
    while len(latencies_ms) < expected and time.monotonic() < deadline:
        reply = client.xread({keys.events: cursor}, block=200, count=1000)
        now = time.time()
        for entry_id, fields in reply[0][1] if reply else []:
            cursor = entry_id
            sent = sent_at.get(fields.get(b"trade_id", b""))
            if fields.get(b"type") == b"case_added" and sent is not None:
                latencies_ms.append((now - sent) * 1000)


def _percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[index], 3)


def run_ingest_bench(
    settings: Settings, events_n: int, repeats: int, rate: float, duration_s: float
) -> dict[str, Any]:
    """Every ingest figure of issue 2 in one run."""
    events = [bench_trade(i, "tp") for i in range(events_n)]
    payload_bytes = statistics.mean(sum(len(k) + len(v) for k, v in e.items()) for e in events)
    with bench_redis(settings) as url:
        client = connect(url)
        redis_used = redis_label(client, settings)
        settings = settings.with_overrides(redis_url=url)
        runs: dict[str, list[float]] = {"raw": [], "archive-off": [], "archive-on": []}
        # Scratch archives are deleted only at the end: deleting thousands of files between
        # runs makes the next run's file creation wait on the discards (mount option).
        scratch = bench_archive_dir(settings)
        try:
            for _ in range(repeats):  # interleaved, so drift on a shared machine hits each alike
                for mode, figures in runs.items():
                    figures.append(timed_throughput(client, settings, events, mode, scratch))
            latency = {
                mode: steady_latency(
                    client, settings, rate, duration_s, scratch / mode, mode == "archive-on"
                )
                for mode in ("archive-on", "archive-off")
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    median = {mode: statistics.median(figures) for mode, figures in runs.items()}
    return {
        "redis": redis_used,
        "events": events_n,
        "payload_bytes": round(payload_bytes),
        "repeats": repeats,
        "events_per_s": {mode: round(v) for mode, v in median.items()},
        "ratio_to_raw": {
            "archive-off": round(median["archive-off"] / median["raw"], 3),
            "archive-on": round(median["archive-on"] / median["raw"], 3),
        },
        "latency_at_rate": {"rate_per_s": rate, "duration_s": duration_s, **latency},
    }


def render_ingest(result: dict[str, Any]) -> str:
    """The ingest figures for people."""
    eps, ratio, lat = result["events_per_s"], result["ratio_to_raw"], result["latency_at_rate"]
    return "\n".join(
        [
            f"ingest bench on {result['redis']}: {result['events']} events of "
            f"~{result['payload_bytes']} bytes, 50 % losses, median of {result['repeats']} "
            "interleaved runs",
            f"  raw XREADGROUP+XACK loop   {eps['raw']:>9,} events/s  (baseline)",
            f"  detector, archive off      {eps['archive-off']:>9,} events/s  "
            f"ratio {ratio['archive-off']:.3f}  (aim >= 0.3)",
            f"  detector, archive on       {eps['archive-on']:>9,} events/s  "
            f"ratio {ratio['archive-on']:.3f}  (aim >= 0.15)",
            f"  XADD -> case queued at a steady {lat['rate_per_s']:.0f} events/s for "
            f"{lat['duration_s']:.0f} s (aim p99 < 5 ms):",
            *(
                f"    {mode:<12} {row['cases']} cases: p50 {row['p50_ms']} ms, "
                f"p99 {row['p99_ms']} ms, max {row['max_ms']:.1f} ms"
                for mode, row in lat.items()
                if mode in ("archive-on", "archive-off")
            ),
        ]
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase bench` and its targets."""
    parser = sub.add_parser(
        "bench",
        help="measure throughput and latency against a raw Redis baseline",
        description="Benchmarks. Each reports ratios against raw Redis measured in the same run.",
    )
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    ingest = targets.add_parser(
        "ingest",
        parents=[connection_options(), archive_options()],
        help="detector events/s vs the raw XREADGROUP+XACK loop, and XADD-to-queue latency",
        description=(
            "Starts its own redis-server unless NEGCASE_REDIS_URL is set (bench keys use "
            "their own namespaces and are deleted after)."
        ),
    )
    ingest.add_argument("--events", type=int, default=20_000, help="events per run (20000)")
    ingest.add_argument("--repeats", type=int, default=3, help="interleaved runs (3)")
    ingest.add_argument("--rate", type=float, default=1000.0, help="latency load, events/s")
    ingest.add_argument("--duration", type=float, default=10.0, help="latency run seconds (10)")
    ingest.add_argument("--json", action="store_true", help="print JSON")
    ingest.set_defaults(run=run_ingest)

    from negcase.sim import bench_partitions

    bench_partitions.register(targets, [connection_options()])

    train = targets.add_parser(
        "train",
        parents=[connection_options(), archive_options()],
        help="intensive session time per priority, and cases/s for 1 vs 2 trainers",
        description="Starts its own redis-server unless NEGCASE_REDIS_URL is set (bench keys "
        "use their own namespaces and are deleted after).",
    )
    train.add_argument("--cases", type=int, default=40, help="cases per drain run (40)")
    train.add_argument("--epochs", type=int, default=300, help="epochs per drained case (300)")
    train.add_argument(
        "--repeats", type=int, default=3, help="interleaved drain runs of each setup (3)"
    )
    train.add_argument("--json", action="store_true", help="print JSON")
    train.set_defaults(run=run_train)

    serve = targets.add_parser(
        "serve",
        parents=[connection_options()],
        help="inference: round trip, worker throughput, Predictor latency, reload latency",
        description=(
            "Starts its own redis-server unless NEGCASE_REDIS_URL is set (bench keys use "
            "their own namespaces and are deleted after), and its own `negcase serve` workers."
        ),
    )
    serve.add_argument("--requests", type=int, default=2000, help="round trips timed (2000)")
    serve.add_argument("--drain", type=int, default=50_000, help="requests per drain (50000)")
    serve.add_argument(
        "--publishes",
        type=int,
        default=400,
        help="publishes, half with 1 worker, half with 2 (400: 200 each, enough for a p99)",
    )
    serve.add_argument("--json", action="store_true", help="print JSON")
    serve.set_defaults(run=run_serve)

    learn = targets.add_parser(
        "learn",
        parents=[walk_options()],
        help="the backtest on the full S&P 500, NASDAQ and WTI daily files (needs arch)",
        description=(
            "Run `negcase backtest` with the same options on each market's full file from the "
            "arch package (pip install arch): the daily S&P 500 and NASDAQ 1999-2018, and the "
            "daily WTI spot price 1986-2019 (its OHLC derived from the closes: see "
            "negcase.sim.bench_learn), and print each run's table with its run time, then a "
            "summary of every run against the learning bar (--seeds). A few minutes per market "
            "and seed: the yardstick every change to learning is judged with."
        ),
    )
    learn.add_argument(
        "--markets", help="comma-separated, from sp500, nasdaq, wti (default: all three)"
    )
    learn.add_argument(
        "--seeds",
        metavar="LIST",
        help=(
            "run each market with each of these seeds instead of one (--seed): seeds and "
            "ranges, 0-3 or 0,2,5. After the tables (text output only), a summary: each run's "
            "latest checkpoint against the control rule, the first checkpoint and the offline "
            "model, with intervals, and whether it meets the learning bar (a loss rate below "
            "the first checkpoint's and not above the control rule's)"
        ),
    )
    learn.add_argument("--json", action="store_true", help="print the reports as JSON")
    learn.set_defaults(run=run_learn)

    soak = targets.add_parser(
        "soak",
        parents=[connection_options()],
        help="used_memory over hundreds of thousands of trades: retention levels it off",
        description="Starts its own redis-server unless NEGCASE_REDIS_URL is set (its keys "
        "use their own namespace and are deleted after).",
    )
    soak.add_argument("--trades", type=int, default=500_000, help="trades (500000)")
    soak.add_argument("--every", type=int, default=25_000, help="a reading every (25000)")
    soak.add_argument("--json", action="store_true", help="print JSON")
    soak.set_defaults(run=run_soak)


def run_learn(args: argparse.Namespace) -> int:
    """Run the learning bench (the backtest imports torch, so only now)."""
    from negcase.sim.bench_learn import run_bench_learn

    return run_bench_learn(args)


def run_train(args: argparse.Namespace) -> int:
    """Run the train bench (its module imports torch, so only now)."""
    from negcase.sim.bench_train import run_bench_train

    return run_bench_train(args)


def run_serve(args: argparse.Namespace) -> int:
    """Run the serve bench (its module imports torch, so only now)."""
    from negcase.sim.bench_serve import run_bench_serve

    return run_bench_serve(args)


def run_soak(args: argparse.Namespace) -> int:
    """Run the soak bench."""
    from negcase.sim.bench_soak import run_bench_soak

    return run_bench_soak(args)


def run_ingest(args: argparse.Namespace) -> int:
    """Run the ingest bench and print its figures."""
    settings = one_partition(settings_from(args), "bench ingest")
    result = run_ingest_bench(settings, args.events, args.repeats, args.rate, args.duration)
    print(
        orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
        if args.json
        else render_ingest(result)
    )
    return 0
