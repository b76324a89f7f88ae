"""`negcase bench train`: wall time of one intensive session per priority (default model, one
CPU thread), and cases/s drained by 2 trainer processes sharing one queue (half the cores
each) against the faster of a single trainer on one thread and on every core (the threads it
would have alone), in interleaved repeated runs compared by their medians.
Its command line is in negcase.sim.bench, which imports this module (and torch) only to run."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis
import torch

from negcase.cli.options import one_partition, settings_from
from negcase.processes.trainer import Trainer
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.case import ACTIONS, NegativeCase
from negcase.schemas.outcome import Outcome
from negcase.sim.bench_support import bench_redis, drop_namespace, redis_label
from negcase.sim.engine import synthetic_case
from negcase.sim.supervisor import worker_environment
from negcase.store.archive import Archive
from negcase.store.cases import Batch, BatchLimits, CaseStore
from negcase.store.connection import connect
from negcase.store.queue import is_held_out

ROOT = Path(__file__).resolve().parent.parent
PRIORITY_LOSS_PCT = {1: 0.5, 2: 1.5, 3: 3.0, 4: 7.0, 5: 15.0}


def bench_case(n: int, priority: int, epochs: int, feature_count: int) -> NegativeCase:
    """A synthetic case whose label follows a simple rule of its features."""
    features = [((n * 7919 + i * 104729) % 2000) / 1000 - 1 for i in range(feature_count)]
    label = ACTIONS[0] if features[0] + features[1] > 0.3 else ACTIONS[1]
    loss = PRIORITY_LOSS_PCT[priority]
    return synthetic_case(
        f"nc-bench-{n:06d}",
        f"bench-{n}",
        features,
        label,
        priority,
        epochs,
        loss,
        1_700_000_000_000 + n,
        "bench",
    )


def add_cases(client: redis.Redis, settings: Settings, cases: list[NegativeCase]) -> None:
    """Store and queue cases through the detector's batch write."""
    CaseStore(client, settings.keys).add(cases, "bench")


def add_outcomes(client: redis.Redis, settings: Settings, count: int) -> None:
    """Record `count` decisions (the bench cases' features and labels) as outcomes, through
    the detector's batch write: the replay store and validation window sessions draw on."""
    batch = Batch()
    for n in range(count):
        case = bench_case(1_000_000 + n, 1, 1, settings.feature_count)
        move = 0.01 if case.what_should_have_been_done == "BUY" else -0.01
        outcome = Outcome(
            case.trade_id,
            "win",
            "BUY",
            case.what_should_have_been_done,
            move,
            0.0,
            1.0,
            case.features,
            case.created_at_ms,
        )
        batch.add_outcome_only(
            "win", case.trade_id, None, outcome=(outcome.to_msgpack(), n % 10 == 0)
        )
    limits = BatchLimits(
        outcomes_maxlen=settings.outcomes_maxlen, validation_maxlen=settings.validation_size
    )
    CaseStore(client, settings.keys).record_batch(batch, limits)


def session_times(settings: Settings, history: int) -> dict[int, dict[str, float]]:
    """Seconds for one session per priority, early stop off (every planned epoch runs), on a
    store that already holds `history` outcomes to replay and judge by. The first session
    (the warm start, not timed) makes the checkpoint the timed ones build on."""
    torch.set_num_threads(1)
    client = connect(settings.redis_url or "")
    fc = settings.feature_count
    add_outcomes(client, settings, history)
    full = settings.with_overrides(early_stop_patience=0, min_outcomes=0)
    trainer = Trainer(client, full, "bench", Archive(settings.data_dir))
    results = {}
    # Timed cases must be trainable: a held-out case is never claimed for training.
    numbers = (
        n
        for n in itertools.count(history)
        if not is_held_out(f"nc-bench-{n:06d}", settings.heldout_share)
    )
    for n, (number, priority) in enumerate(zip(numbers, [1, 1, 2, 3, 4, 5], strict=False)):
        # the first run warms torch up
        add_cases(
            client, settings, [bench_case(number, priority, settings.epochs_for(priority), fc)]
        )
        leases = trainer.queue.claim("bench")
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            session = trainer.train_claimed(leases, StopFlag())
        elapsed = time.perf_counter() - started
        if n:
            results[priority] = {
                "seconds": round(elapsed, 3),
                "epochs": session.epochs_completed,
                "outcome": session.outcome,
            }
    return results


def available_cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def drain_rate(
    settings: Settings, trainers: int, threads: int, cases: int, epochs: int
) -> dict[str, float]:
    """Cases/s drained by `trainers` processes of `threads` torch threads each: from the
    first training_started to the last training_completed, so that process start-up
    (importing torch) is not counted."""
    client = connect(settings.redis_url or "")
    add_cases(
        client, settings, [bench_case(n, 3, epochs, settings.feature_count) for n in range(cases)]
    )
    add_outcomes(client, settings, 200)
    env = {
        **worker_environment(settings),
        "NEGCASE_EARLY_STOP_PATIENCE": "0",
        "NEGCASE_MIN_OUTCOMES": "0",
    }
    command = [sys.executable, "-m", "negcase", "train", "--burst", "--threads", str(threads)]
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        for _ in range(trainers)
    ]
    for process in processes:
        process.wait()
    stamps = {b"training_started": [], b"training_completed": []}
    for _, fields in client.xrange(settings.keys.events):
        stamps.get(fields[b"type"], []).append(int(fields[b"at_ms"]))
    span_s = (max(stamps[b"training_completed"]) - min(stamps[b"training_started"])) / 1000
    done = len(stamps[b"training_completed"])
    return {"cases": done, "seconds": round(span_s, 3), "cases_per_s": round(done / span_s, 3)}


def drain_setups(cores: int) -> list[tuple[int, int]]:
    """(trainers, torch threads each) to compare: one trainer on one thread and on every
    core (the threads it would have alone; the better of the two is the baseline), and two
    trainers sharing the cores."""
    return sorted({(1, 1), (1, cores), (2, max(1, cores // 2))})


def drain_runs(
    url: str, settings: Settings, folder: Path, cases: int, epochs: int, repeats: int
) -> dict[str, Any]:
    """Each setup `repeats` times, interleaved (the order turns each round) so that drift on
    a shared machine hits every setup alike; each run in its own namespace and folder."""
    cores = available_cores()
    setups = drain_setups(cores)
    rates: dict[tuple[int, int], list[float]] = {setup: [] for setup in setups}
    client = connect(url)
    for repeat in range(repeats):
        turn = repeat % len(setups)
        for trainers, threads in setups[turn:] + setups[:turn]:
            name = f"drain-{trainers}x{threads}-{repeat}"
            namespace = f"negcase-bench-{name}"
            run = settings.with_overrides(
                redis_url=url, namespace=namespace, data_dir=folder / name
            )
            try:
                figures = drain_rate(run, trainers, threads, cases, epochs)
            finally:
                drop_namespace(client, namespace)
            rates[trainers, threads].append(figures["cases_per_s"])
    medians = {setup: statistics.median(runs) for setup, runs in rates.items()}
    alone = max((setup for setup in setups if setup[0] == 1), key=medians.__getitem__)
    shared = next(setup for setup in setups if setup[0] == 2)
    return {
        "cores": cores,
        "repeats": repeats,
        "drains": [
            {
                "trainers": trainers,
                "threads_each": threads,
                "cases_per_s": rates[trainers, threads],
                "median_cases_per_s": round(medians[trainers, threads], 3),
            }
            for trainers, threads in setups
        ],
        "drain_baseline_threads": alone[1],
        "drain_ratio": round(medians[shared] / medians[alone], 3),
    }


def run_train_bench(settings: Settings, cases: int, epochs: int, repeats: int) -> dict[str, Any]:
    """Every figure of the bench, each run in its own namespace and archive folder."""
    folder = Path(tempfile.mkdtemp(prefix="negcase-bench-train-"))
    result: dict[str, Any] = {"drain_cases": cases, "drain_epochs_per_case": epochs}
    try:
        with bench_redis(settings) as url:
            client = connect(url)
            result["redis"] = redis_label(client, settings)
            namespace = "negcase-bench-sessions"
            run = settings.with_overrides(
                redis_url=url, namespace=namespace, data_dir=folder / "sessions"
            )
            try:
                result["sessions"] = session_times(run, history=200)
            finally:
                drop_namespace(client, namespace)
            result.update(drain_runs(url, settings, folder, cases, epochs, repeats))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def render(result: dict[str, Any]) -> str:
    """The figures as text."""
    lines = [
        f"train bench on {result['redis']}, {result['cores']} cores",
        "  one session per priority, default model, 1 CPU thread, replay on:",
    ]
    for priority, figures in result["sessions"].items():
        lines.append(
            f"    priority {priority}: {figures['epochs']:>5} epochs in "
            f"{figures['seconds']:.3f} s ({figures['outcome']})"
        )
    lines.append(
        f"  {result['drain_cases']} cases of {result['drain_epochs_per_case']} epochs drained, "
        f"{result['repeats']} interleaved runs each:"
    )
    for figures in result["drains"]:
        runs = ", ".join(f"{rate:.2f}" for rate in figures["cases_per_s"])
        lines.append(
            f"    {figures['trainers']} trainer(s), {figures['threads_each']} torch thread(s) "
            f"each: median {figures['median_cases_per_s']:.2f} cases/s (runs: {runs})"
        )
    lines.append(
        f"  2 trainers vs the faster single trainer ({result['drain_baseline_threads']} "
        f"thread(s)): {result['drain_ratio']:.2f}x, ratio of the medians (aim >= 1.6 on 2 cores)"
    )
    return "\n".join(lines)


def run_bench_train(args: argparse.Namespace) -> int:
    """Run the train bench and print its figures."""
    settings = one_partition(settings_from(args), "bench train")
    result = run_train_bench(settings, args.cases, args.epochs, args.repeats)
    print(
        orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
        if args.json
        else render(result)
    )
    return 0
