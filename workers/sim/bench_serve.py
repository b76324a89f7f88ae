"""`negcase bench serve`: remote round trip, one worker's throughput, the in-process
Predictor's latency, and reload latency with one and two workers, each beside a raw
baseline measured in the same run (these machines are shared; absolute figures drift).
Its command line is in negcase.sim.bench, which imports this module (and torch) only to run."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
import torch

from negcase.cli.options import settings_from
from negcase.client.predictor import Predictor
from negcase.client.signal_client import SignalClient
from negcase.processes.model import (
    build_model,
    sha256_hex,
    spec_from_settings,
    state_of,
    weights_bytes,
)
from negcase.runtime.settings import Settings
from negcase.schemas.signal import request_fields, signal_from_probabilities
from negcase.sim.bench_support import FEATURES, bench_redis, drop_namespace, redis_label
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import connect
from negcase.store.keys import Keys
from negcase.store.signals import ReplyBatch, SignalStore

# A constant reply of the real shape: the baseline pays for no model and no encoding.
RAW_REPLY = signal_from_probabilities([0.1, 0.1, 0.8], 0, "raw", "raw").to_json()


def percentiles_ms(seconds: list[float]) -> dict[str, float | int]:
    """n, p50, max and the tail percentiles that n samples can tell apart from the maximum
    (p90 from 20 samples, p99 from 200: with fewer, the nearest rank is the maximum), of
    durations in seconds, as milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return {"n": 0}

    def at(pct: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))] * 1e3, 4)

    figures: dict[str, float | int] = {"n": len(ordered), "p50_ms": at(50)}
    for pct, least in ((90, 20), (99, 200)):
        if len(ordered) >= least:
            figures[f"p{pct}_ms"] = at(pct)
    figures["max_ms"] = round(ordered[-1] * 1e3, 4)
    return figures


def tail_text(figures: dict[str, float | int]) -> str:
    """The highest percentile the sample supports, named for what it is."""
    for key in ("p99_ms", "p90_ms"):
        if key in figures:
            return f"{key[:3]} {figures[key]} ms"
    return f"max of {figures['n']} {figures.get('max_ms')} ms"


def raw_echo(url: str, namespace: str) -> None:
    """The baseline worker: the same read and the same write as `negcase serve`, with a
    constant reply instead of validation, a forward pass and encoding."""
    client = connect(url)
    store = SignalStore(client, Keys(namespace), reply_ttl_s=30, dead_maxlen=1000)
    store.ensure_group()
    while True:
        entries = store.read_new("raw", 256, 1000)
        replies = [(fields[b"request_id"].decode(), RAW_REPLY) for _, fields in entries]
        store.write(ReplyBatch(replies=replies, handled_ids=[entry_id for entry_id, _ in entries]))


class Workers:
    """`negcase serve` processes for one namespace; stopped when the block ends."""

    def __init__(self, settings: Settings, url: str) -> None:
        # No canary: the bench measures hot reload, and no trade outcomes would judge one.
        self.env = dict(
            os.environ,
            NEGCASE_REDIS_URL=url,
            NEGCASE_NAMESPACE=settings.namespace,
            NEGCASE_CANARY_SHARE="0",
        )
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        """Start one worker named `name`."""
        process = subprocess.Popen(
            [sys.executable, "-m", "negcase", "serve", "--consumer", name],
            env=self.env,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """SIGTERM every worker and wait for it."""
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(30)
        self.processes.clear()


def round_trips(client: SignalClient, n: int) -> list[float]:
    """Seconds per request, one request at a time."""
    client.request(FEATURES, timeout_s=30)  # warm: connection, first batch
    took = []
    for _ in range(n):
        started = time.perf_counter()
        client.request(FEATURES, timeout_s=30)
        took.append(time.perf_counter() - started)
    return took


def drain_rate(client: redis.Redis, keys: Keys, pause: Callable[[bool], None], n: int) -> float:
    """Requests/s answered: `n` are queued while the worker is paused, then timed from
    resuming until the stream is empty (answered requests are deleted)."""
    pause(True)
    prefix = os.urandom(4).hex()
    for start in range(0, n, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.xadd(keys.requests, request_fields(f"{prefix}-{i}", FEATURES))
        pipe.execute()
    started = time.perf_counter()
    pause(False)
    while client.xlen(keys.requests):
        time.sleep(0.001)
    return n / (time.perf_counter() - started)


def _stopper(process: Any) -> Callable[[bool], None]:
    def pause(paused: bool) -> None:
        os.kill(process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    return pause


def predictor_latency(client: redis.Redis, settings: Settings, n: int) -> dict[str, Any]:
    """Predictor.predict per call, beside the bare forward pass of the same model."""
    with Predictor(client, settings) as predictor:
        predictor.predict(FEATURES)
        took = []
        for _ in range(n):
            started = time.perf_counter()
            predictor.predict(FEATURES)
            took.append(time.perf_counter() - started)
        model, x = predictor.reloader.live.model, torch.tensor([FEATURES])
    bare = []
    with torch.inference_mode():
        for _ in range(n):
            started = time.perf_counter()
            model(x)
            bare.append(time.perf_counter() - started)
    return {"predict": percentiles_ms(took), "bare_forward": percentiles_ms(bare)}


def reload_latency(
    client: redis.Redis, settings: Settings, blobs: list[bytes], workers: set[str]
) -> dict[str, Any]:
    """Per publish: from just before `latest` moves to the first reply by the new version,
    for each worker (`per_worker`) and for the last of them (`all_workers`)."""
    registry = CheckpointRegistry(client, settings.keys)
    meta = {
        "feature_count": settings.feature_count,
        "model_spec": spec_from_settings(settings).to_dict(),
        "trainer": "bench",
    }
    prober = SignalClient(client, settings.namespace)
    _wait_for_workers(client, settings.keys, prober, workers)
    per_worker, all_workers = [], []
    for weights in blobs:
        started = time.perf_counter()
        version = registry.publish(weights, sha256_hex(weights), meta, registry.latest_version())
        waiting = set(workers)
        while waiting:
            if time.perf_counter() - started > 10:
                raise TimeoutError(f"v{version}: no reply from {sorted(waiting)} in 10 s")
            for raw in _probe(client, settings.keys, prober, 4):
                reply = orjson.loads(raw)
                if reply["model_version"] >= version and reply["worker"] in waiting:
                    waiting.discard(reply["worker"])
                    per_worker.append(time.perf_counter() - started)
        all_workers.append(time.perf_counter() - started)
        time.sleep(0.02)
    return {"per_worker": percentiles_ms(per_worker), "all_workers": percentiles_ms(all_workers)}


def _wait_for_workers(
    client: redis.Redis, keys: Keys, prober: SignalClient, workers: set[str]
) -> None:
    """Probe until every worker has answered: a worker that is still starting would
    otherwise count its start-up as reload time."""
    waiting = set(workers)
    deadline_s = time.monotonic() + 60
    while waiting and time.monotonic() < deadline_s:
        waiting -= {orjson.loads(raw)["worker"] for raw in _probe(client, keys, prober, 4)}
    if waiting:
        raise TimeoutError(f"workers {sorted(waiting)} did not answer within 60 s")


def _probe(client: redis.Redis, keys: Keys, prober: SignalClient, n: int) -> list[bytes]:
    """Send `n` requests one by one, so that while one worker is busy with the first the
    next goes to another (a pipeline would hand all of them to the same worker)."""
    ids = [prober.next_request_id() for _ in range(n)]
    for request_id in ids:
        client.xadd(keys.requests, request_fields(request_id, FEATURES))
    pipe = client.pipeline(transaction=False)
    for request_id in ids:
        pipe.blpop([keys.reply(request_id)], timeout=3)
    return [popped[1] for popped in pipe.execute() if popped]


def run_serve_bench(settings: Settings, requests_n: int, drain_n: int, publishes: int) -> dict:
    """Every figure of the serve bench, in one run against one Redis."""
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    with bench_redis(settings) as url:
        client = connect(url)
        result["redis"] = redis_label(client, settings)
        tag = os.urandom(3).hex()
        raw_ns, ns = f"bench-raw-{tag}", f"bench-serve-{tag}"
        settings = settings.with_overrides(redis_url=url, namespace=ns)
        blobs = [_seeded_blob(settings, seed) for seed in range(publishes + 1)]
        registry = CheckpointRegistry(client, settings.keys)
        registry.publish(blobs[0], sha256_hex(blobs[0]), _meta(settings), None)
        raw = multiprocessing.get_context("spawn").Process(
            target=raw_echo, args=(url, raw_ns), daemon=True
        )
        raw.start()
        workers = Workers(settings, url)
        try:
            result["ping_ms"] = percentiles_ms(_pings(client, requests_n))
            raw_client = SignalClient(client, raw_ns)
            result["raw_round_trip"] = percentiles_ms(round_trips(raw_client, requests_n))
            worker = workers.start("bench-1")
            signals = SignalClient(client, ns)
            result["round_trip"] = percentiles_ms(round_trips(signals, requests_n))
            result["raw_per_s"] = round(drain_rate(client, Keys(raw_ns), _stopper(raw), drain_n))
            result["worker_per_s"] = round(
                drain_rate(client, settings.keys, _stopper(worker), drain_n)
            )
            result["predictor"] = predictor_latency(client, settings, requests_n * 5)
            result["reload_1_worker"] = reload_latency(
                client, settings, blobs[1 : publishes // 2 + 1], {"bench-1"}
            )
            workers.start("bench-2")
            result["reload_2_workers"] = reload_latency(
                client, settings, blobs[publishes // 2 + 1 :], {"bench-1", "bench-2"}
            )
        finally:
            workers.stop()
            raw.kill()
            for namespace in (raw_ns, ns):
                drop_namespace(client, namespace)
    return result


def _pings(client: redis.Redis, n: int) -> list[float]:
    took = []
    for _ in range(n):
        started = time.perf_counter()
        client.ping()
        took.append(time.perf_counter() - started)
    return took


def _seeded_blob(settings: Settings, seed: int) -> bytes:
    torch.manual_seed(seed)
    return weights_bytes(state_of(build_model(spec_from_settings(settings))))


def _meta(settings: Settings) -> dict[str, Any]:
    return {
        "feature_count": settings.feature_count,
        "model_spec": spec_from_settings(settings).to_dict(),
        "trainer": "bench",
    }


def render(result: dict[str, Any]) -> str:
    """The figures for people, with the aims of issue 4 and the raw baselines."""
    rt, raw_rt = result["round_trip"], result["raw_round_trip"]
    pred = result["predictor"]
    lines = [
        f"serve bench on {result['redis']}",
        f"PING round trip           p50 {result['ping_ms']['p50_ms']} ms",
        f"raw XADD+BLPOP echo       p50 {raw_rt['p50_ms']} ms, {tail_text(raw_rt)}",
        f"remote signal round trip  p50 {rt['p50_ms']} ms, {tail_text(rt)} (aim p50 < 1); "
        f"{rt['p50_ms'] / raw_rt['p50_ms']:.2f}x raw",
        f"one worker, batched load  {result['worker_per_s']:,} predictions/s (aim >= 20,000); "
        f"raw echo {result['raw_per_s']:,}/s = {result['worker_per_s'] / result['raw_per_s']:.2f}x",
        f"Predictor.predict         p50 {pred['predict']['p50_ms'] * 1000:.1f} us, "
        f"p99 {pred['predict']['p99_ms'] * 1000:.1f} us (aim < 100 us); bare forward "
        f"p50 {pred['bare_forward']['p50_ms'] * 1000:.1f} us",
    ]
    for label, key in (("1 worker ", "reload_1_worker"), ("2 workers", "reload_2_workers")):
        each, last = result[key]["per_worker"], result[key]["all_workers"]
        lines.append(
            f"reload, {label}         p50 {each['p50_ms']} ms, {tail_text(each)} per worker "
            f"({each['n']} loads); all workers {tail_text(last)} ({last['n']} publishes) "
            "(aim p99 < 50)"
        )
    return "\n".join(lines)


def run_bench_serve(args: argparse.Namespace) -> int:
    """Run the serve bench and print its figures."""
    result = run_serve_bench(settings_from(args), args.requests, args.drain, args.publishes)
    print(
        orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if args.json else render(result)
    )
    return 0
