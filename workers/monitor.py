"""`negcase status` and `negcase tail`: what people look at."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import redis

from schemas.event import EVENT_TYPES, Event
from store.cases import RATE_BUCKET_S, rate_bucket_s
from store.health import live_workers
from store.keys import DETECTOR_GROUP, Keys
from store.queue import score_range
from workers.options import CommandError, common_options, redis_client, settings_from

RATE_WINDOW_S = 60
PRIORITIES = (5, 4, 3, 2, 1)
RATE_FIELDS = ("trades", "losses", "cases_added", "dead_lettered")


def gather_status(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Everything `negcase status` shows, read in two round trips."""
    now_s = time.time()
    buckets = [
        keys.rate_bucket(rate_bucket_s(now_s) - RATE_BUCKET_S * back)
        for back in range(1, RATE_WINDOW_S // RATE_BUCKET_S + 1)
    ]
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.trades)
    pipe.xlen(keys.trades_dead)
    pipe.xrevrange(keys.trades_dead, count=3)
    pipe.hgetall(keys.stats)
    pipe.scard(keys.cases)
    pipe.scard(keys.featureless)
    pipe.zcard(keys.queue)
    for priority in PRIORITIES:
        pipe.zcount(keys.queue, *score_range(priority))
    pipe.zcard(keys.leased)
    pipe.scard(keys.done)
    pipe.hlen(keys.dead)
    pipe.get(keys.latest)
    for bucket in buckets:
        pipe.hmget(bucket, RATE_FIELDS)
    (
        stream_length, dead_letters, latest_dead, stats, total, featureless, queued,
        p5, p4, p3, p2, p1, leased, done, dead, latest, *rate_rows,
    ) = pipe.execute()  # fmt: skip
    counters = {k.decode(): _number(v) for k, v in stats.items()}
    return {
        "namespace": keys.namespace,
        "trades": {
            "stream_length": stream_length,
            **_detector_group(client, keys),
            "dead_letters": dead_letters,
            "latest_dead_reasons": [
                (fields.get(b"dead:reason") or b"").decode("utf-8", "replace")
                for _, fields in latest_dead
            ],
        },
        "cases": {
            "total": total,
            "queued": queued,
            "leased": leased,
            "done": done,
            "dead": dead,
            "without_features": featureless,
            "queued_by_priority": {"5": p5, "4": p4, "3": p3, "2": p2, "1": p1},
        },
        "rates_per_s": _rates(rate_rows),
        "counters": {k: v for k, v in sorted(counters.items()) if not k.startswith("model:")},
        "models": per_model_version(counters),
        "latest_checkpoint": int(latest) if latest else None,
    }


def _detector_group(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    try:
        groups = client.xinfo_groups(keys.trades)
    except redis.ResponseError:  # no stream yet
        groups = []
    group = next(
        (g for g in groups if g["name"] in (DETECTOR_GROUP, DETECTOR_GROUP.encode())), None
    )
    if group is None:
        return {"pending": 0, "consumers": 0, "lag": None, "oldest_pending_idle_ms": None}
    oldest = client.xpending_range(keys.trades, DETECTOR_GROUP, "-", "+", 1)
    lag = group.get("lag")
    if lag is None:  # Redis 6.2 has no lag field: count what was not delivered yet, capped.
        last = group["last-delivered-id"].decode()
        lag = len(client.xrange(keys.trades, min=f"({last}", count=10_000))
    return {
        "pending": group["pending"],
        "consumers": group["consumers"],
        "lag": lag,
        "oldest_pending_idle_ms": oldest[0]["time_since_delivered"] if oldest else None,
    }


def _rates(rows: list[list[bytes | None]]) -> dict[str, float]:
    totals = dict.fromkeys(RATE_FIELDS, 0)
    for row in rows:
        for name, value in zip(RATE_FIELDS, row, strict=True):
            totals[name] += int(value or 0)
    return {name: round(total / RATE_WINDOW_S, 2) for name, total in totals.items()}


def per_model_version(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """Trades, losses, loss rate and mean loss per model_version, from the stats counters."""
    models: dict[str, dict[str, float]] = {}
    for name, value in counters.items():
        if name.startswith("model:"):
            _, version, field = name.split(":", 2)
            models.setdefault(version, {})[field] = value
    for row in models.values():
        trades = row.get("trades", 0)
        losses = row.get("losses", 0)
        row["loss_rate"] = round(losses / trades, 4) if trades else 0.0
        row["mean_loss_pct"] = round(row.pop("loss_pct_sum", 0) / losses, 4) if losses else 0.0
    return dict(sorted(models.items(), key=lambda item: _version_order(item[0])))


def _version_order(label: str) -> tuple[int, int]:
    return (0, -1) if label == "none" else (1, int(label))


def _number(raw: bytes) -> float:
    value = float(raw)
    return int(value) if value.is_integer() else value


def render_status(status: dict[str, Any]) -> str:
    """The status as text for people."""
    trades, cases, rates = status["trades"], status["cases"], status["rates_per_s"]
    idle = trades["oldest_pending_idle_ms"]
    lines = [
        f"namespace {status['namespace']}",
        f"trades stream  {trades['stream_length']} entries | pending {trades['pending']}"
        + (f" (oldest idle {idle / 1000:.1f}s)" if idle is not None else "")
        + f" | lag {trades['lag']} | detectors {trades['consumers']}",
        f"rates (60 s)   {rates['trades']:.1f} trades/s | {rates['losses']:.1f} losses/s | "
        f"{rates['cases_added']:.1f} cases/s | {rates['dead_lettered']:.1f} dead letters/s",
        f"cases          {cases['total']} trainable = {cases['queued']} queued + "
        f"{cases['leased']} leased + {cases['done']} done + {cases['dead']} dead"
        f" | {cases['without_features']} without features (archived only)",
        "queued by priority  "
        + "  ".join(f"P{p}: {n}" for p, n in cases["queued_by_priority"].items()),
        f"dead letters   {trades['dead_letters']}"
        + "".join(f"\n  latest: {reason}" for reason in trades["latest_dead_reasons"]),
        f"latest checkpoint  {status['latest_checkpoint'] or 'none'}",
        "per model version  trades  losses  loss rate  mean loss",
    ]
    for version, row in status["models"].items():
        lines.append(
            f"  {version:>16}  {row.get('trades', 0):>6}  {row.get('losses', 0):>6}  "
            f"{row['loss_rate']:>9.1%}  {row['mean_loss_pct']:>8.2f}%"
        )
    counters = status["counters"]
    lines.append("counters       " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    return "\n".join(lines)


# --- tail -----------------------------------------------------------------------------


def _case_added(d: dict[str, str]) -> str:
    return (
        f"NEGATIVE CASE ADDED: {d.get('case_id')} | {d.get('symbol')} {d.get('side')} | "
        f"Loss: ${float(d.get('loss_amount', 0)):.2f} ({float(d.get('loss_pct', 0)):.1f}%) | "
        f"Priority: {d.get('priority')} | Should have: {d.get('should_have')}"
    )


def _dead_lettered(d: dict[str, str]) -> str:
    return (
        f"DEAD LETTER: entry {d.get('entry_id')} | trade {d.get('trade_id', '?')} | "
        f"{d.get('field')}: {d.get('reason')}"
    )


FORMATTERS: dict[str, Callable[[dict[str, str]], str]] = {
    "case_added": _case_added,
    "dead_lettered": _dead_lettered,
}


def format_event(event: Event) -> str:
    """One readable line per event."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at_ms / 1000))
    formatter = FORMATTERS.get(event.type)
    if formatter is not None:
        return f"{stamp} {formatter(event.details)}"
    details = " | ".join(f"{k}: {v}" for k, v in event.details.items())
    return f"{stamp} {event.type.upper().replace('_', ' ')}: {details}"


def follow_events(
    client: redis.Redis, keys: Keys, last: int, block_ms: int = 1000
) -> Iterable[Event | None]:
    """Events from the `last` most recent on, then new ones as they come; None when a
    blocking read timed out (so callers can check for a stop)."""
    cursor = "$"
    if last > 0:
        recent = client.xrevrange(keys.events, count=last)
        for entry_id, fields in reversed(recent):
            yield Event.from_fields(fields)
            cursor = entry_id
        if not recent:
            cursor = "0-0"
    while True:
        reply = client.xread({keys.events: cursor}, block=block_ms, count=500)
        if not reply:
            yield None
            continue
        for entry_id, fields in reply[0][1]:
            cursor = entry_id
            yield Event.from_fields(fields)


def _wanted(event: Event, types: set[str], symbols: set[str]) -> bool:
    if types and event.type not in types:
        return False
    return not symbols or event.details.get("symbol") in symbols


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase status` and `negcase tail`."""
    status = sub.add_parser(
        "status",
        parents=[common_options()],
        help="show the stream, the case queue, dead letters, rates and per-model loss rates",
        description="One screen of what an operator asks first; --json for scripts.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=run_status)

    health = sub.add_parser(
        "health",
        parents=[common_options()],
        help="exit 0 if a worker (of --kind, on --this-host) is alive, else 1",
        description=(
            "Each worker refreshes <ns>:health:<kind>:<host>:<pid> with a TTL "
            "(NEGCASE_HEALTH_TTL_S). This lists the live ones and exits 0 if any match: use it "
            "as a container health check, e.g. `negcase health --kind detector --this-host`."
        ),
    )
    health.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=("detector", "trainer", "inference", "dashboard"),
        help="only workers of this kind (repeatable)",
    )
    health.add_argument("--this-host", action="store_true", help="only workers on this host")
    health.set_defaults(run=run_health)

    tail = sub.add_parser(
        "tail",
        parents=[common_options()],
        help="follow <ns>:events, one readable line per event",
        description="Follow the events stream: cases added, training, checkpoints, dead letters.",
    )
    tail.add_argument("--last", type=int, default=10, help="show the N most recent first (10)")
    tail.add_argument(
        "--type",
        action="append",
        default=[],
        choices=EVENT_TYPES,
        help="only this event type (repeatable)",
    )
    tail.add_argument("--symbol", action="append", default=[], help="only this symbol (repeatable)")
    tail.add_argument("--count", type=int, help="exit after printing this many events")
    tail.add_argument("--json", action="store_true", help="print each event as a JSON line")
    tail.set_defaults(run=run_tail)


def run_health(args: argparse.Namespace) -> int:
    """Exit 0 when a matching worker beat recently, 1 otherwise (for container checks)."""
    settings = settings_from(args)
    try:
        client = redis_client(settings)
    except CommandError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    host = socket.gethostname() if args.this_host else None
    workers = [
        w for w in live_workers(client, settings.keys)
        if (not args.kind or w.get("kind") in args.kind) and (host is None or w.get("host") == host)
    ]  # fmt: skip
    for worker in workers:
        print(orjson.dumps(worker).decode())
    if not workers:
        print("unhealthy: no matching worker has beaten recently", file=sys.stderr)
        return 1
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Print the status once."""
    settings = settings_from(args)
    status = gather_status(redis_client(settings), settings.keys)
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_status(status))
    return 0


def run_tail(args: argparse.Namespace) -> int:
    """Follow events until Ctrl-C or --count."""
    settings = settings_from(args)
    client = redis_client(settings)
    types, symbols = set(args.type), set(args.symbol)
    shown = 0
    try:
        for event in follow_events(client, settings.keys, args.last):
            if event is None or not _wanted(event, types, symbols):
                continue
            if args.json:
                line = orjson.dumps({"type": event.type, "at_ms": event.at_ms, **event.details})
                print(line.decode(), flush=True)
            else:
                print(format_event(event), flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        sys.stderr.close()
    return 0
