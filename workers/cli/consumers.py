"""`negcase prune --idle-s N`: remove consumers that left no work behind from the consumer
groups. A worker that stops cleanly leaves its group itself; one that was killed stays in
XINFO CONSUMERS for good, and every restart under a new name (host:pid) adds one."""

from __future__ import annotations

import argparse

import orjson

from negcase.cli.options import CommandError, connection_options, redis_client, settings_from
from negcase.cli.status import every_group_stream
from negcase.store.streams import group_consumers, leave_group


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase prune`."""
    prune = sub.add_parser(
        "prune",
        parents=[connection_options()],
        help="remove consumers idle longer than --idle-s from the consumer groups",
        description=(
            "Delete (XGROUP DELCONSUMER) every consumer of the 'detectors' and 'inference' "
            "groups that has been idle longer than --idle-s and holds no pending entries; one "
            "that holds pending entries is kept and named (deleting it would lose them: a "
            "live worker claims them after NEGCASE_CLAIM_IDLE_MS). A running worker reads at "
            "least every NEGCASE_BLOCK_MS, so it is never idle for long. `negcase status` "
            "lists idle consumers."
        ),
    )
    prune.add_argument(
        "--idle-s", type=float, required=True, help="remove consumers idle longer than this"
    )
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    prune.add_argument("--json", action="store_true", help="print JSON")
    prune.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    """Remove idle consumers without pending entries, group by group."""
    if args.idle_s <= 0:
        raise CommandError("--idle-s must be positive")
    settings = settings_from(args)
    client = redis_client(settings)
    min_idle_ms = int(args.idle_s * 1000)
    report = []
    for s in every_group_stream(settings.keys, settings.partitions):
        for consumer in group_consumers(client, s.stream, s.group):
            if consumer["idle_ms"] < min_idle_ms:
                continue
            if args.dry_run:
                outcome = "pending" if consumer["pending"] else "would be deleted"
            else:
                # The script checks again: a consumer that read meanwhile stays.
                outcome, _ = leave_group(
                    client, s.stream, s.group, str(consumer["name"]), min_idle_ms
                )
            report.append(
                {
                    "group": s.group,
                    "stream": s.stream,
                    "consumer": consumer["name"],
                    "idle_ms": consumer["idle_ms"],
                    "pending": consumer["pending"],
                    "outcome": outcome,
                }
            )
    if args.json:
        print(orjson.dumps({"idle_s": args.idle_s, "consumers": report}).decode())
    else:
        for row in report:
            print(_line(row, settings.partitions > 1))
        deleted = sum(row["outcome"] in ("deleted", "would be deleted") for row in report)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {deleted} consumer(s) idle over {args.idle_s:g}s")
    return 0


def _line(row: dict[str, object], several_streams: bool) -> str:
    idle_s = int(row["idle_ms"]) / 1000  # type: ignore[call-overload]
    # With partitions a detector is a consumer of each partition's stream: say which.
    group = f"{row['group']} on {row['stream']}" if several_streams else row["group"]
    head = f"{group}: {row['consumer']} (idle {idle_s:.0f}s)"
    if row["outcome"] == "pending":
        entries = "entry" if row["pending"] == 1 else "entries"
        return f"{head}: kept, deleting it would lose {row['pending']} pending {entries}"
    if row["outcome"] == "active":
        return f"{head}: kept, it read again meanwhile"
    return f"{head}: {row['outcome']}"
