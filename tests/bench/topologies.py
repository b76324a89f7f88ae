"""Detector throughput beyond one Redis: `python -m tests.bench.topologies [--events N]`.

Starts its own servers: one Redis; a primary with a replica; a three-primary Cluster. On
each it drains the same trades with one in-process detector (archive off), interleaved and
repeated, and reports events/s and ratios to the single server measured in the same run:
  replica-acks-0 / -1  the primary with a replica, NEGCASE_MIN_REPLICA_ACKS 0 and 1 (WAIT)
  cluster              the Cluster, a hash-tagged namespace (all of negcase on one node)
It also reports Redis memory per stored case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from negcase.processes.detector import LossDetector
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.sim.bench import bench_trade, fill_stream
from negcase.store.connection import connect
from negcase.store.local_redis import LocalRedis
from tests.topologies import LocalCluster, wait_for


def drain_rate(url: str, events: list[dict[bytes, bytes]], acks: int, run: int) -> float:
    """Events/s of one detector draining `events` on a fresh hash-tagged namespace."""
    settings = Settings(
        redis_url=url, namespace=f"{{bench-{run}}}", archive=False, min_replica_acks=acks
    )
    client = connect(url)
    fill_stream(client, settings.keys, events)
    started = time.perf_counter()
    handled = LossDetector(client, settings, "bench", None).run(StopFlag(), burst=True).entries
    elapsed = time.perf_counter() - started
    assert handled == len(events), f"handled {handled} of {len(events)}"
    return handled / elapsed


def memory_per_case(url: str) -> float:
    """Bytes of Redis memory per stored case: its blob, queue and set entries, counters (the
    trades stream and the events stream are not counted: both are capped)."""
    client = connect(url)
    client.flushall()
    settings = Settings(redis_url=url, namespace="{mem}", archive=False)
    fill_stream(client, settings.keys, [bench_trade(i, "mem") for i in range(4000)])
    before = client.info("memory")["used_memory"]
    LossDetector(client, settings, "mem", None).run(StopFlag(), burst=True)
    client.delete(settings.keys.events)
    after = client.info("memory")["used_memory"]
    return (after - before) / client.scard(settings.keys.cases)


def _linked(replica: LocalRedis) -> bool:
    return connect(replica.url).info("replication")["master_link_status"] == "up"


def main() -> int:
    """Run every topology, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    events = [bench_trade(i, "topo") for i in range(args.events)]
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        single = LocalRedis(base / "single").start()
        primary = LocalRedis(base / "primary").start()
        follow = ["--replicaof", "127.0.0.1", str(primary.port)]
        replica = LocalRedis(base / "replica", extra_args=follow).start()
        wait_for(lambda: _linked(replica), "the replica to sync")
        cluster = LocalCluster(base / "cluster").start()
        try:
            modes = {
                "single": (single.url, 0),
                "replica-acks-0": (primary.url, 0),
                "replica-acks-1": (primary.url, 1),
                "cluster": (cluster.url, 0),
            }
            rates: dict[str, list[float]] = {mode: [] for mode in modes}
            run = 0
            for _ in range(args.repeats):  # interleaved: drift on a shared machine hits all
                for mode, (url, acks) in modes.items():
                    run += 1
                    rates[mode].append(drain_rate(url, events, acks, run))
            per_case = memory_per_case(single.url)
        finally:
            cluster.stop()
            replica.stop()
            primary.stop()
            single.stop()
    median = {mode: statistics.median(values) for mode, values in rates.items()}
    for mode, value in median.items():
        print(f"{mode:>15}: {value:8.0f} events/s, {value / median['single']:.2f}x single")
    print(f"Redis memory per case: {per_case:.0f} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
