"""`negcase bench partitions`: detector throughput with 1 and with N partitions on the Redis
Cluster NEGCASE_REDIS_URL names, one detector process per partition, interleaved and
repeated, as a ratio against the 1-partition run of the same run (README, "Scale")."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson
import redis

from negcase.runtime.chunks import chunks
from negcase.runtime.settings import Settings
from negcase.sim.bench import bench_trade
from negcase.sim.bench_support import drop_namespace, redis_label
from negcase.sim.supervisor import worker_environment
from negcase.store.connection import connect, server_of
from negcase.store.keys import DETECTOR_GROUP, Keys, partition_of

PIPELINE = 1000


def symbols_for(partitions: int) -> list[str]:
    """One symbol per partition: trades spread evenly over the partitions."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        symbol = f"SYM{n}/USDT"
        found.setdefault(partition_of(symbol, partitions), symbol)
        n += 1
    return [found[p] for p in range(partitions)]


def spread_namespace(client: redis.Redis, partitions: int) -> str:
    """A tagged namespace whose partitions sit on as many different primaries as there are
    (a partition's slot is fixed by its name; which node owns it is the Cluster's map)."""
    best, best_nodes = "", 0
    for n in range(200):
        namespace = f"{{bench{n}}}"
        parts = Keys(namespace).partitioned(partitions)
        nodes = {
            server_of(client, part.trades).connection_pool.connection_kwargs["port"]
            for part in parts
        }
        if len(nodes) > best_nodes:
            best, best_nodes = namespace, len(nodes)
        if best_nodes == partitions:
            break
    return best


def timed_run(settings: Settings, trades: list[dict[bytes, bytes]], partitions: int) -> float:
    """Events per second of `partitions` detector processes draining `trades` (published
    to their symbols' partitions first), from start to the last one's exit."""
    client = connect(settings.redis_url or "")
    namespace = spread_namespace(client, partitions)
    keys = Keys(namespace)
    run = settings.with_overrides(namespace=namespace, partitions=partitions)
    for part in run.partition_keys:
        client.xgroup_create(part.trades, DETECTOR_GROUP, id="0", mkstream=True)
    for batch in chunks(trades, PIPELINE):
        pipe = client.pipeline(transaction=False)
        for fields in batch:
            symbol = fields[b"symbol"].decode()
            pipe.xadd(keys.partition(partition_of(symbol, partitions), partitions).trades, fields)
        pipe.execute()
    env = run_env(run)
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "negcase",
                "detect",
                "--burst",
                "--no-archive",
                "--consumer",
                f"bench{p}",
                "--partitions",
                str(p),
            ],
            env=env,
        )
        for p in range(partitions)
    ]
    codes = [process.wait() for process in processes]
    elapsed = time.perf_counter() - started
    try:
        assert codes == [0] * partitions, f"detectors exited with {codes}"
        handled = sum(client.scard(part.cases) for part in run.partition_keys)
        assert handled == len(trades) // 2, f"{handled} cases of {len(trades) // 2} losses"
    finally:
        for part in keys.with_partitions(partitions):
            drop_namespace(client, part.namespace)
    return len(trades) / elapsed


def run_env(settings: Settings) -> dict[str, str]:
    """The environment a detector process of these settings gets."""
    return {**os.environ, **worker_environment(settings)}


def run_partition_bench(
    settings: Settings, events_n: int, repeats: int, partitions: int
) -> dict[str, Any]:
    """Detector throughput with 1 and with `partitions` partitions, interleaved."""
    symbols = symbols_for(partitions)
    trades = []
    for i in range(events_n):
        fields = bench_trade(i, "pt")
        fields[b"symbol"] = symbols[i % partitions].encode()
        trades.append(fields)
    runs: dict[int, list[float]] = {1: [], partitions: []}
    for _ in range(repeats):
        for count, figures in runs.items():
            figures.append(timed_run(settings, trades, count))
    median = {count: statistics.median(figures) for count, figures in runs.items()}
    client = connect(settings.redis_url or "")
    return {
        "redis": redis_label(client, settings),
        "events": events_n,
        "repeats": repeats,
        "events_per_s": {str(count): round(value) for count, value in median.items()},
        "runs": {str(count): [round(v) for v in figures] for count, figures in runs.items()},
        "ratio_to_one_partition": round(median[partitions] / median[1], 3),
    }


def register(targets: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add `negcase bench partitions`."""
    parser = targets.add_parser(
        "partitions",
        parents=parents,
        help="detector throughput with 1 vs N partitions on a Redis Cluster",
        description="Drain the same trades of evenly spread symbols with one detector process "
        "per partition, 1 partition against --partitions, interleaved --repeats times, on "
        "the Cluster NEGCASE_REDIS_URL names (a redis+cluster:// URL); prints the medians and "
        "their ratio. Keys live in namespaces of their own, deleted after.",
    )
    parser.add_argument("--events", type=int, default=30_000, help="trades per run (30000)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each (3)")
    parser.add_argument("--partitions", type=int, default=3, help="partitions against 1 (3)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the partition bench and print its figures."""
    from negcase.cli.options import settings_from

    result = run_partition_bench(settings_from(args), args.events, args.repeats, args.partitions)
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        n = str(args.partitions)
        print(
            f"partition bench on {result['redis']}: {result['events']} events, median of "
            f"{result['repeats']} interleaved runs, one detector process per partition\n"
            f"  1 partition    {result['events_per_s']['1']:>9,} events/s  (baseline)\n"
            f"  {n} partitions   {result['events_per_s'][n]:>9,} events/s  "
            f"ratio {result['ratio_to_one_partition']:.3f}"
        )
    return 0
