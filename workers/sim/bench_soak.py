"""`negcase bench soak` (registered in sim/bench.py): push hundreds of thousands of trades
through the detector and a simulated trainer, and print Redis's `used_memory` as it goes:
with retention on, it levels off. The trainer is simulated (claim and ack, a session per
claim, no torch): what it stores in Redis is what a real one stores, at a rate a real one
could not reach on a bench machine. Checkpoints are left out: NEGCASE_KEEP_CHECKPOINTS of
them, each the model's size, are a constant.
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from negcase.cli.options import one_partition, settings_from
from negcase.client.trades import encode_trade
from negcase.processes.detector import LossDetector
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.session import TrainingSession
from negcase.sim.bench_support import FEATURES, bench_redis, drop_namespace
from negcase.store.connection import connect
from negcase.store.memory import memory_report
from negcase.store.queue import CaseQueue
from negcase.store.retention import Retention
from negcase.store.sessions import SessionStore

# Each DUPLICATE_EVERY-th trade repeats an earlier one; each MALFORMED_EVERY-th is invalid.
DUPLICATE_EVERY = 50
MALFORMED_EVERY = 100
CASES_PER_SESSION = 100
MB = 1024 * 1024
RETENTION_SETTINGS = (
    "trades_maxlen",
    "events_maxlen",
    "dead_letters_maxlen",
    "dedup_window_s",
    "dedup_max_ids",
    "case_retention_s",
    "case_retention_count",
    "sessions_kept",
)


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """How many trades, in chunks of how many, a memory reading every how many."""

    trades: int = 500_000
    chunk: int = 5_000
    every: int = 25_000


def soak_settings(settings: Settings) -> Settings:
    """Retention small enough to level off within the run; each is a NEGCASE_* setting."""
    return settings.with_overrides(
        namespace=f"soak-{uuid.uuid4().hex[:8]}",
        archive=False,
        trades_maxlen=50_000,
        events_maxlen=50_000,
        dead_letters_maxlen=5_000,
        dedup_window_s=3_600.0,
        dedup_max_ids=100_000,
        case_retention_s=0.0,
        case_retention_count=20_000,
        sessions_kept=1_000,
        heldout_share=0.0,
    )


def soak_trade(i: int) -> dict[str, Any]:
    """The i-th trade, flat fields of about 300 bytes like the ingest bench's, half of them
    losses; some repeat an earlier trade, some are malformed."""
    n = i - 25 if i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1 else i
    trade = {
        "trade_id": f"soak-{n:09d}",
        "symbol": "ETH/USDT",
        "side": "BUY",
        "entry_price": -1.0 if i % MALFORMED_EVERY == MALFORMED_EVERY - 1 else 3000.0,
        "exit_price": 2970.0 if n % 2 else 3030.0,
        "quantity": 0.5,
        "leverage": 3.0,
        "fee_rate": 0.0004,
        "closed_at": 1795513508000 + n,
        "opened_at": 1795513400000 + n,
        "confidence": 0.62,
        "model_version": n % 4,
        "features": FEATURES,
        "technical_indicators": {"rsi": 61.2, "macd": -0.41},
    }
    return encode_trade(trade, "flat")


def run_soak(client: redis.Redis, settings: Settings, plan: SoakPlan) -> dict[str, Any]:
    """Push `plan.trades` trades through; returns the memory readings and the final report."""
    keys = settings.keys
    detector = LossDetector(client, settings, "soak", None)
    queue = CaseQueue(client, keys, lease_s=60.0)
    sessions = SessionStore(client, keys, None, settings.events_maxlen, settings.sessions_kept)
    retention = Retention.of(client, settings)
    readings = [_reading(client, settings, 0, 0.0)]
    started = time.perf_counter()
    for first in range(0, plan.trades, plan.chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + plan.chunk, plan.trades)):
            pipe.xadd(keys.trades, soak_trade(i))
        pipe.execute()
        detector.run(StopFlag(), burst=True)
        _train_everything(queue, sessions)
        retention.retire_cases()
        done = min(first + plan.chunk, plan.trades)
        if done % plan.every == 0 or done == plan.trades:
            readings.append(_reading(client, settings, done, time.perf_counter() - started))
    final = memory_report(client, keys)
    blobs = final["families"]["case blobs"]
    return {
        "settings": {name: getattr(settings, name) for name in RETENTION_SETTINGS},
        "readings": readings,
        "final": final,
        "bytes_per_case_blob": round(blobs["bytes"] / blobs["keys"]) if blobs["keys"] else None,
        "bytes_per_case_in_redis": _per_case(final),
    }


def _train_everything(queue: CaseQueue, sessions: SessionStore) -> None:
    """What trainers do to Redis, minus the training: claim, a session, ack (a fifth of
    them refused by the gate, as real sessions often are)."""
    while leases := queue.claim("soak-trainer", CASES_PER_SESSION):
        now_ms = int(time.time() * 1000)
        session = TrainingSession(
            session_id=f"s-{now_ms}-{uuid.uuid4().hex[:8]}",
            trainer="soak-trainer",
            start_time_ms=now_ms,
            case_ids=[lease.case_id for lease in leases],
            base_version=None,
            epochs_planned=1,
        )
        sessions.started(session, now_ms, now_ms + 60_000)
        rejected = "soak: refused by the gate" if now_ms % 5 == 0 else None
        queue.ack(leases, rejected_reason=rejected)
        session.outcome = "rejected" if rejected else "published"
        session.training_active = False
        sessions.completed(session, now_ms)


def _reading(client: redis.Redis, settings: Settings, trades: int, elapsed_s: float) -> dict:
    keys = settings.keys
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    pipe.scard(keys.cases)
    pipe.zcard(keys.seen)
    pipe.xlen(keys.trades)
    pipe.xlen(keys.events)
    pipe.zcard(keys.sessions)
    info, cases, seen, trades_len, events_len, sessions = pipe.execute()
    return {
        "trades": trades,
        "elapsed_s": round(elapsed_s, 1),
        "used_memory_bytes": info["used_memory"],
        "cases_in_redis": cases,
        "seen_ids": seen,
        "trades_stream": trades_len,
        "events_stream": events_len,
        "sessions": sessions,
    }


def _per_case(final: dict[str, Any]) -> int | None:
    """Bytes a retained case costs in Redis, all in: its blob and its index entries."""
    families = final["families"]
    cases = families["case blobs"]["keys"]
    if not cases:
        return None
    held = families["case blobs"]["bytes"] + families["finished-case indexes"]["bytes"]
    return round(held / cases)


def render(result: dict[str, Any]) -> str:
    """The soak's figures for people."""
    lines = [
        "soak bench: retention " + ", ".join(f"{k}={v}" for k, v in result["settings"].items()),
        f"  {'trades':>9}  {'s':>6}  {'used_memory':>11}  {'cases':>7}  {'seen ids':>8}  "
        f"{'trades':>7}  {'events':>7}  {'sessions':>8}",
    ]
    for row in result["readings"]:
        lines.append(
            f"  {row['trades']:>9,}  {row['elapsed_s']:>6.1f}  "
            f"{row['used_memory_bytes'] / MB:>8.1f} MB  {row['cases_in_redis']:>7,}  "
            f"{row['seen_ids']:>8,}  {row['trades_stream']:>7,}  {row['events_stream']:>7,}  "
            f"{row['sessions']:>8,}"
        )
    lines.append("  at the end, by key family:")
    for family, row in result["final"]["families"].items():
        if row["bytes"]:
            lines.append(
                f"    {family:<26} {row['keys']:>9,} keys {row['bytes'] / MB:>8.2f} MB  "
                f"({row['how']})"
            )
    lines.append(
        f"  a case blob: {result['bytes_per_case_blob']} bytes; a retained case, blob and "
        f"index entries: {result['bytes_per_case_in_redis']} bytes"
    )
    return "\n".join(lines)


def run_bench_soak(args: argparse.Namespace) -> int:
    """Run the soak bench and print its figures."""
    settings = soak_settings(one_partition(settings_from(args), "bench soak"))
    plan = SoakPlan(trades=args.trades, chunk=min(5_000, args.every), every=args.every)
    with bench_redis(settings) as url:
        client = connect(url)
        settings = settings.with_overrides(redis_url=url)
        try:
            result = run_soak(client, settings, plan)
        finally:
            drop_namespace(client, settings.namespace)
    print(
        orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if args.json else render(result)
    )
    return 0
