"""`negcase status` and `negcase health`: what an operator asks first, read in a few
round trips."""

from __future__ import annotations

import argparse
import math
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson
import redis
from redis.client import Pipeline

from negcase.cli.options import CommandError, connection_options, redis_client, settings_from
from negcase.cli.status_view import render_status
from negcase.store.cases import RATE_BUCKET_S, RATE_WINDOW_S, rate_bucket_s, version_label
from negcase.store.checkpoints import version_of
from negcase.store.connection import server_of
from negcase.store.health import live_workers
from negcase.store.keys import DETECTOR_GROUP, INFERENCE_GROUP, Keys
from negcase.store.live import LiveStats, window_stats, z_score
from negcase.store.memory import memory_report
from negcase.store.queue import priority_of_score, queue_counts, score_range

PRIORITIES = (5, 4, 3, 2, 1)
RATE_FIELDS = ("trades", "losses", "cases_added", "dead_lettered")
LEASES_SHOWN = 10
REASONS_SHOWN = 3
CHECKPOINTS_SHOWN = 5
LIVE_VERSIONS_SHOWN = 6
# XINFO GROUPS has no `lag` before Redis 7, and from 7 on it is nil once entries were deleted
# (inference XDELs what it answered): the undelivered entries are then counted with an
# exclusive XRANGE, which reads them, so it stops at this many.
LAG_COUNT_CAP = 10_000
# A live consumer reads at least every NEGCASE_BLOCK_MS (at most 20 s): one silent this long
# is gone (`negcase prune` removes such consumers).
IDLE_CONSUMER_MS = 60_000

Reads = dict[str, Callable[[Pipeline], object]]


@dataclass(frozen=True, slots=True)
class GroupStream:
    """A stream read by a consumer group, and the stream its unusable entries go to."""

    section: str
    stream: str
    group: str
    dead: str


def group_streams(keys: Keys) -> tuple[GroupStream, ...]:
    """The trade stream (detectors) and the signal request stream (inference)."""
    return (
        GroupStream("trades", keys.trades, DETECTOR_GROUP, keys.trades_dead),
        GroupStream("signals", keys.requests, INFERENCE_GROUP, keys.requests_dead),
    )


def every_group_stream(keys: Keys, partitions: int) -> tuple[GroupStream, ...]:
    """group_streams with the trade stream of every partition (the signal request stream is
    the namespace's)."""
    if partitions <= 1:
        return group_streams(keys)
    trades = (group_streams(part)[0] for part in keys.partitioned(partitions))
    return (*trades, group_streams(keys)[1])


def gather_status(client: redis.Redis, keys: Keys, partitions: int = 1) -> dict[str, Any]:
    """Everything `negcase status` shows; with partitions, the namespace's own status with
    the partitions' trades, cases, leases, rates, counters and memory summed into it, and
    `partitions` breaking them down (each partition is read as a namespace of its own)."""
    memory = {"memory": memory_report(client, keys, partitions)}
    if partitions <= 1:
        return _gather_one(client, keys) | memory
    whole = _gather_one(client, keys)
    parts = [_gather_one(client, part) for part in keys.partitioned(partitions)]
    counters = _summed_counters(client, keys.with_partitions(partitions))
    return {
        **whole,
        "trades": _summed_stream([part["trades"] for part in parts]),
        "cases": _summed_cases([part["cases"] for part in parts]),
        "leases": sorted(
            (row for part in parts for row in part["leases"]), key=lambda row: row["deadline_ms"]
        )[:LEASES_SHOWN],
        "rates_per_s": {
            name: round(sum(part["rates_per_s"][name] for part in parts), 2) for name in RATE_FIELDS
        },
        "counters": {k: v for k, v in sorted(counters.items()) if not k.startswith("model:")},
        "models": per_model_version(counters),
        "partitions": [
            {
                "partition": index,
                "namespace": part["namespace"],
                "trades": {name: part["trades"][name] for name in PARTITION_STREAM_FIELDS},
                "cases": {name: part["cases"][name] for name in PARTITION_CASE_FIELDS},
                "rates_per_s": part["rates_per_s"],
            }
            for index, part in enumerate(parts)
        ],
        **memory,
    }


PARTITION_STREAM_FIELDS = ("stream_length", "pending", "lag", "consumers", "dead_letters")
PARTITION_CASE_FIELDS = ("queued", "leased", "done", "dead", "total", "conserved")


def _summed_counters(client: redis.Redis, keys: Sequence[Keys]) -> dict[str, float]:
    """The stats counters of the namespace and of every partition, added up."""
    pipe = client.pipeline(transaction=False)
    for one in keys:
        pipe.hgetall(one.stats)
    counters: dict[str, float] = {}
    for stats in pipe.execute():
        for name, value in stats.items():
            counters[name.decode()] = counters.get(name.decode(), 0) + _number(value)
    return counters


def _summed_stream(streams: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The partitions' trades streams as one: lengths and backlogs added up."""
    lags = [s["lag"] for s in streams]
    idle = [s["oldest_pending_idle_ms"] for s in streams if s["oldest_pending_idle_ms"] is not None]
    return {
        **streams[0],
        **{
            name: sum(s[name] for s in streams) for name in PARTITION_STREAM_FIELDS if name != "lag"
        },
        "lag": None if None in lags else sum(lags),
        "lag_capped": any(s["lag_capped"] for s in streams),
        "consumer_list": [row for s in streams for row in s["consumer_list"]],
        "oldest_pending_idle_ms": max(idle) if idle else None,
        "latest_dead_reasons": [r for s in streams for r in s["latest_dead_reasons"]][
            :REASONS_SHOWN
        ],
    }


def _summed_cases(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The partitions' case counts added up; conserved when every partition is."""
    counted = ("queued", "leased", "done", "dead", "rejected", "held_out", "total")
    return {
        **{name: sum(c[name] for c in cases) for name in counted},
        "conserved": all(c["conserved"] for c in cases),
        "without_features": sum(c["without_features"] for c in cases),
        "queued_by_priority": {
            str(p): sum(c["queued_by_priority"][str(p)] for c in cases) for p in PRIORITIES
        },
        "dead_reasons": {k: v for c in cases for k, v in c["dead_reasons"].items()},
        "rejected_reasons": {k: v for c in cases for k, v in c["rejected_reasons"].items()},
    }


def _gather_one(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Everything `negcase status` shows of one namespace (or partition): one MULTI for the
    case counts, one pipeline of independent reads, one of the reads that depend on those,
    and the health keys."""
    counts = queue_counts(client, keys)  # one MULTI: the conservation check is exact
    streams = group_streams(keys)
    # Every key of the namespace is on one server (in a Cluster, the owner of its slot):
    # pipelining there keeps TIME, which a Cluster pipeline refuses, in the same round trip.
    server = server_of(client, keys.stats)
    first = _pipelined(server, _first_reads(keys, streams), may_fail=_group_reads(streams))
    second = _pipelined(server, _second_reads(keys, streams, first))
    now_ms = first["time"][0] * 1000 + first["time"][1] // 1000
    counters = {k.decode(): _number(v) for k, v in first["stats"].items()}
    workers = live_workers(client, keys)
    return {
        "namespace": keys.namespace,
        "redis_time_ms": now_ms,
        **{s.section: _stream_status(s, first, second) for s in streams},
        "cases": _case_status(counts, first),
        "leases": _lease_rows(first["leased"], second.get("lease_records", []), now_ms),
        "rates_per_s": _rates([first[f"rate:{i}"] for i in range(_rate_buckets())]),
        "counters": {k: v for k, v in sorted(counters.items()) if not k.startswith("model:")},
        "models": per_model_version(counters),
        "latest_checkpoint": version_of(first["latest"]),
        "checkpoints": _checkpoint_rows(first["versions"], second),
        "workers": _worker_rows(workers, now_ms),
        "workers_alive": _alive_by_kind(workers),
        "serving": serving_versions(workers),
        "live": _live_status(first, second),
    }


def _pipelined(
    client: redis.Redis, reads: Reads, may_fail: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Run `reads` in one round trip; their replies by name. A read named in `may_fail`
    gets its error as its reply (XINFO on a stream nobody created yet)."""
    if not reads:
        return {}
    pipe = client.pipeline(transaction=False)
    for queue in reads.values():
        queue(pipe)
    replies = dict(zip(reads, pipe.execute(raise_on_error=False), strict=True))
    for name, reply in replies.items():
        if isinstance(reply, Exception) and name not in may_fail:
            raise reply
    return replies


def _rate_buckets() -> int:
    return RATE_WINDOW_S // RATE_BUCKET_S


def _group_reads(streams: Sequence[GroupStream]) -> frozenset[str]:
    reads = ("groups", "oldest", "consumers")
    return frozenset(f"{s.section}:{read}" for s in streams for read in reads)


def _first_reads(keys: Keys, streams: Sequence[GroupStream]) -> Reads:
    """Every read that needs nothing read before it."""
    newest_bucket_s = rate_bucket_s(time.time())
    reads: Reads = {
        "time": lambda p: p.time(),
        "stats": lambda p: p.hgetall(keys.stats),
        "featureless": lambda p: p.scard(keys.featureless),
        # HSCAN's first page: a sample of reasons, since a hash keeps no order.
        "dead_reasons": lambda p: p.hscan(keys.dead, 0, count=REASONS_SHOWN),
        "rejected_reasons": lambda p: p.hscan(keys.rejected, 0, count=REASONS_SHOWN),
        # Soonest deadline first: expired leases the reaper has not returned yet lead.
        "leased": lambda p: p.zrange(keys.leased, 0, LEASES_SHOWN - 1, withscores=True),
        "latest": lambda p: p.get(keys.latest),
        "versions": lambda p: p.zrevrange(keys.versions, 0, CHECKPOINTS_SHOWN - 1),
        "serving": lambda p: p.hgetall(keys.serving),
        "serving_history": lambda p: p.lrange(keys.serving_history, 0, -1),
        "live_versions": lambda p: p.zrevrange(keys.live_versions, 0, LIVE_VERSIONS_SHOWN - 1),
    }
    for priority in PRIORITIES:
        reads[f"priority:{priority}"] = lambda p, n=priority: p.zcount(keys.queue, *score_range(n))
    for back in range(_rate_buckets()):
        bucket = keys.rate_bucket(newest_bucket_s - RATE_BUCKET_S * (back + 1))
        reads[f"rate:{back}"] = lambda p, key=bucket: p.hmget(key, RATE_FIELDS)
    for s in streams:
        reads |= {
            f"{s.section}:length": lambda p, s=s: p.xlen(s.stream),
            f"{s.section}:groups": lambda p, s=s: p.xinfo_groups(s.stream),
            f"{s.section}:oldest": lambda p, s=s: p.xpending_range(s.stream, s.group, "-", "+", 1),
            f"{s.section}:consumers": lambda p, s=s: p.xinfo_consumers(s.stream, s.group),
            f"{s.section}:dead_length": lambda p, s=s: p.xlen(s.dead),
            f"{s.section}:dead_latest": lambda p, s=s: p.xrevrange(s.dead, count=REASONS_SHOWN),
        }
    return reads


def _second_reads(keys: Keys, streams: Sequence[GroupStream], first: dict[str, Any]) -> Reads:
    """The reads that need the first round's replies: lease records, checkpoint metadata,
    and the lag that Redis 6.2 does not report."""
    reads: Reads = {}
    case_ids = [case_id for case_id, _ in first["leased"]]
    if case_ids:
        reads["lease_records"] = lambda p: p.hmget(keys.leases, case_ids)
    for raw in first["versions"]:
        key = keys.checkpoint(int(raw))
        reads[f"meta:{int(raw)}"] = lambda p, key=key: p.hget(key, "meta")
    for version in _live_versions_shown(first):
        key = keys.live(version)
        reads[f"live:{version}"] = lambda p, key=key: p.lrange(key, 0, -1)
    for s in streams:
        group = _group_info(first[f"{s.section}:groups"], s.group)
        if group is not None and group.get("lag") is None:
            since = f"({_text(group['last-delivered-id'])}"
            reads[f"{s.section}:undelivered"] = lambda p, s=s, since=since: p.xrange(
                s.stream, min=since, count=LAG_COUNT_CAP
            )
    return reads


def _group_info(groups: list[dict[str, Any]] | Exception, name: str) -> dict[str, Any] | None:
    if isinstance(groups, Exception):  # no stream yet
        return None
    return next((g for g in groups if _text(g["name"]) == name), None)


def _stream_status(s: GroupStream, first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """A stream, its consumer group's backlog, and its latest dead letters."""
    group = _group_info(first[f"{s.section}:groups"], s.group)
    lag = None if group is None else group.get("lag")
    if group is not None and lag is None:
        lag = len(second[f"{s.section}:undelivered"])
    return {
        "stream_length": first[f"{s.section}:length"],
        "group": s.group,
        "pending": 0 if group is None else group["pending"],
        "lag": lag,
        "lag_capped": lag == LAG_COUNT_CAP,
        "consumers": 0 if group is None else group["consumers"],
        "consumer_list": _consumer_rows(first[f"{s.section}:consumers"]),
        "oldest_pending_idle_ms": _idle_ms(first[f"{s.section}:oldest"]),
        "dead_letters": first[f"{s.section}:dead_length"],
        "latest_dead_reasons": [
            _text(fields.get(b"dead:reason", b""))
            for _, fields in first[f"{s.section}:dead_latest"]
        ],
    }


def _consumer_rows(infos: list[dict[str, Any]] | Exception) -> list[dict[str, Any]]:
    """The group's consumers, most idle first, each marked idle when silent past
    IDLE_CONSUMER_MS."""
    if isinstance(infos, Exception):  # no stream or group yet
        return []
    rows = [
        {
            "name": _text(info["name"]),
            "pending": int(info["pending"]),
            "idle_ms": int(info["idle"]),
            "idle": int(info["idle"]) >= IDLE_CONSUMER_MS,
        }
        for info in infos
    ]
    return sorted(rows, key=lambda row: -row["idle_ms"])


def _idle_ms(oldest: list[dict[str, Any]] | Exception) -> int | None:
    """How long the oldest pending entry has waited since delivery; None when none is
    pending (or there is no group yet)."""
    if isinstance(oldest, Exception) or not oldest:
        return None
    return oldest[0]["time_since_delivered"]


def _case_status(counts: dict[str, int], first: dict[str, Any]) -> dict[str, Any]:
    """Queue counts with the conservation check, queued by priority, dead and rejected
    reasons."""
    accounted = counts["queued"] + counts["leased"] + counts["done"] + counts["dead"]
    return {
        **counts,
        "conserved": accounted == counts["total"],
        "without_features": first["featureless"],
        "queued_by_priority": {str(p): first[f"priority:{p}"] for p in PRIORITIES},
        "dead_reasons": _reasons(first["dead_reasons"]),
        "rejected_reasons": _reasons(first["rejected_reasons"]),
    }


def _reasons(page: tuple[int, dict[bytes, bytes]]) -> dict[str, str]:
    _, reasons = page
    return {_text(k): _text(v) for k, v in list(reasons.items())[:REASONS_SHOWN]}


def _lease_rows(
    leased: list[tuple[bytes, float]], records: list[bytes | None], now_ms: int
) -> list[dict[str, Any]]:
    """Leases, soonest deadline first: who holds which case, and for how much longer."""
    rows = []
    for (case_id, deadline_ms), record in zip(leased, records, strict=True):
        if record is None:  # acked or reaped between the two round trips
            continue
        # The claim script packs it with Redis's cmsgpack: strings come as msgpack str.
        lease = msgpack.unpackb(record, raw=False)
        rows.append(
            {
                "case_id": _text(case_id),
                "worker": lease["worker"],
                "attempts": lease["attempts"],
                "priority": priority_of_score(float(lease["score"])),
                "token": lease["token"],
                "deadline_ms": int(deadline_ms),
                "deadline_in_s": round((deadline_ms - now_ms) / 1000, 3),
                # As the scripts judge it: a lease holds while its deadline is ahead of TIME.
                "expired": deadline_ms <= now_ms,
            }
        )
    return rows


def _checkpoint_rows(versions: list[bytes], second: dict[str, Any]) -> list[dict[str, Any]]:
    """The newest checkpoints in Redis with their lineage and metrics."""
    rows = []
    for raw in versions:
        version = int(raw)
        # None when it was trimmed between the two round trips.
        meta = orjson.loads(second[f"meta:{version}"] or b"{}")
        rows.append(
            {
                "version": version,
                "parent_version": meta.get("parent_version"),
                "created_at_ms": meta.get("created_at_ms"),
                "trainer": meta.get("trainer"),
                "cases": len(meta.get("case_ids") or ()),
                "metrics": meta.get("metrics") or {},
            }
        )
    return rows


def _live_versions_shown(first: dict[str, Any]) -> list[int]:
    """The versions with live figures to show: those serving names, then the newest."""
    state = first["serving"]
    named = [state.get(b"service"), state.get(b"canary"), *first["serving_history"][:2]]
    versions = [int(v) for v in named if v] + [int(v) for v in first["live_versions"]]
    return list(dict.fromkeys(versions))[:LIVE_VERSIONS_SHOWN]


def _live_status(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """What serves (in service, the canary on trial) and each version's live figures over
    its window; before any serving step, latest is in service."""
    state = {_text(k): _text(v) for k, v in first["serving"].items()}
    service = version_of(state.get("service")) or version_of(first["latest"])
    canary = version_of(state.get("canary"))
    history = [int(v) for v in first["serving_history"]]
    stats = {v: window_stats(second[f"live:{v}"]) for v in _live_versions_shown(first)}
    trial = None
    if canary is not None:
        trial = {
            "version": canary,
            "share": float(state.get("canary_share") or 0),
            "since_ms": _int_or_none(state.get("canary_since_ms")),
            "min_outcomes": _int_or_none(state.get("canary_min_outcomes")),
            "outcomes": stats[canary].n,
            "z": _z_against(stats, canary, service),
        }
    roles = {service: "service", canary: "canary", **dict.fromkeys(history, "earlier")}
    return {
        "service": service,
        "service_since_ms": _int_or_none(state.get("service_since_ms")),
        # serving_step.lua found it worse than the engine's own rule: it answers no opinion
        "service_defers": service is not None and version_of(state.get("defers")) == service,
        "canary": trial,
        "history": history,
        "epoch": int(state.get("epoch") or 0),
        "versions": {
            str(v): {"role": roles.get(v, "-"), **row.to_dict()} for v, row in stats.items()
        },
    }


def _z_against(stats: dict[int, LiveStats], version: int, baseline: int | None) -> float | None:
    """The serving step's comparison so far, once both windows have two outcomes."""
    ours, theirs = stats.get(version), stats.get(baseline) if baseline is not None else None
    if ours is None or theirs is None or ours.n < 2 or theirs.n < 2:
        return None
    z = z_score(ours, theirs)
    return round(z, 3) if math.isfinite(z) else None


def _int_or_none(raw: str | None) -> int | None:
    return int(raw) if raw else None


def worker_name(record: dict[str, Any]) -> str:
    """How a health record names its worker: consumer or trainer name, else host:pid."""
    return (
        record.get("consumer") or record.get("name") or f"{record.get('host')}:{record.get('pid')}"
    )


def serving_versions(workers: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Which inference workers serve which model version ('none': no model loaded yet)."""
    serving: dict[str, list[str]] = {}
    for record in workers:
        if record.get("kind") == "inference":
            label = version_label(record.get("version"))
            serving.setdefault(label, []).append(worker_name(record))
    return dict(sorted(serving.items(), key=lambda item: _version_order(item[0]), reverse=True))


def _worker_rows(workers: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    return [
        {
            "kind": record.get("kind"),
            "name": worker_name(record),
            "host": record.get("host"),
            "pid": record.get("pid"),
            "version": record.get("version"),
            "canary": record.get("canary"),
            "beat_age_s": round((now_ms - record.get("at_ms", now_ms)) / 1000, 1),
        }
        for record in workers
    ]


def _alive_by_kind(workers: list[dict[str, Any]]) -> dict[str, int]:
    alive: dict[str, int] = {}
    for record in workers:
        alive[record.get("kind", "?")] = alive.get(record.get("kind", "?"), 0) + 1
    return alive


def _rates(rows: list[list[bytes | None]]) -> dict[str, float]:
    totals = dict.fromkeys(RATE_FIELDS, 0)
    for row in rows:
        for name, value in zip(RATE_FIELDS, row, strict=True):
            totals[name] += int(value or 0)
    return {name: round(total / RATE_WINDOW_S, 2) for name, total in totals.items()}


def per_model_version(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """Trades, losses, loss rate, mean loss and signals answered per model_version, from the
    stats counters."""
    models: dict[str, dict[str, float]] = {}
    for name, value in counters.items():
        if name.startswith("model:"):
            _, version, field = name.split(":", 2)
            models.setdefault(version, {"trades": 0, "losses": 0, "signals": 0})[field] = value
    for row in models.values():
        trades, losses = row["trades"], row["losses"]
        row["loss_rate"] = round(losses / trades, 4) if trades else 0.0
        row["mean_loss_pct"] = round(row.pop("loss_pct_sum", 0) / losses, 4) if losses else 0.0
    return dict(sorted(models.items(), key=lambda item: _version_order(item[0])))


def _version_order(label: str) -> tuple[int, int]:
    return (0, -1) if label == "none" else (1, int(label))


def _number(raw: bytes) -> float:
    value = float(raw)
    return int(value) if value.is_integer() else value


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase status` and `negcase health`."""
    status = sub.add_parser(
        "status",
        parents=[connection_options()],
        help="show the stream, the case queue, dead letters, rates and per-model loss rates",
        description="One screen of what an operator asks first; --json for scripts.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=run_status)

    health = sub.add_parser(
        "health",
        parents=[connection_options()],
        help="exit 0 if a worker (of --kind, on --this-host, --ready) is alive, else 1",
        description=(
            "Each worker refreshes <ns>:health:<kind>:<host>:<pid> with a TTL "
            "(NEGCASE_HEALTH_TTL_S). This lists the live ones and exits 0 if any match: use it "
            "as a container health check, e.g. `negcase health --kind detector --this-host`. "
            "With --ready only workers that can do their job count: an inference worker is "
            "ready once it serves a model."
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
    health.add_argument(
        "--ready", action="store_true", help="only workers ready to work (inference: has a model)"
    )
    health.add_argument("--json", action="store_true", help="print JSON")
    health.set_defaults(run=run_health)


def is_ready(record: dict[str, Any]) -> bool:
    """Whether a live worker can do its job: an inference worker once it serves a model,
    any other kind as soon as it beats."""
    return record.get("kind") != "inference" or record.get("version") is not None


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
        {**w, "ready": is_ready(w)}
        for w in live_workers(client, settings.keys)
        if (not args.kind or w.get("kind") in args.kind) and (host is None or w.get("host") == host)
    ]
    healthy = [w for w in workers if w["ready"] or not args.ready]
    if args.json:
        print(orjson.dumps({"healthy": bool(healthy), "workers": workers}).decode())
    else:
        for worker in workers:
            print(_health_line(worker))
    if not healthy:
        why = "ready" if workers and args.ready else "matching"
        print(f"unhealthy: no {why} worker has beaten recently", file=sys.stderr)
        return 1
    return 0


def _health_line(worker: dict[str, Any]) -> str:
    version = worker.get("version")
    serves = (
        ""
        if worker.get("kind") != "inference"
        else (f" serving v{version}" if version is not None else " no model yet")
    )
    state = "ready" if worker["ready"] else "not ready"
    where = f"{worker.get('host')}:{worker.get('pid')}"
    return f"{worker.get('kind')} {worker_name(worker)} on {where}: alive, {state}{serves}"


def run_status(args: argparse.Namespace) -> int:
    """Print the status once."""
    settings = settings_from(args)
    status = gather_status(redis_client(settings), settings.keys, settings.partitions)
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_status(status))
    return 0
