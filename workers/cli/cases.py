"""`negcase case ID` (one case, readable, and where it stands) and `negcase requeue --dead |
--rejected [ID...]` (give cases another chance at training)."""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

import msgpack
import orjson
import redis

from negcase.cli.options import (
    CommandError,
    archive_options,
    connection_options,
    redis_client,
    settings_from,
)
from negcase.runtime.settings import Settings
from negcase.schemas.case import NegativeCase, case_id_for
from negcase.store.cases import CaseStore
from negcase.store.keys import Keys, partition_of
from negcase.store.partitions import CaseQueues, grouped, locate
from negcase.store.queue import is_held_out, priority_of_score

# Case ids are `nc-<hex>`, trade ids 1-128 of these characters: nothing that leaves a folder.
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEUE_CHUNK = 500


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase case` and `negcase requeue`."""
    case = sub.add_parser(
        "case",
        parents=[connection_options(), archive_options()],
        help="show one negative case and where it stands",
        description=(
            "Print one negative case (<ns>:case:<id> is msgpack, unreadable with redis-cli): "
            "the trade, the loss, the lesson, and its state in the queue (queued, leased, "
            "done, rejected by the gate, dead, held out). ID is a case id (nc-...) or the "
            "trade_id it came from. A case that Redis no longer holds is read from the "
            "archive (--data-dir)."
        ),
    )
    case.add_argument("id", metavar="ID", help="case id (nc-...) or trade_id")
    case.add_argument("--json", action="store_true", help="print JSON")
    case.set_defaults(run=run_case)

    requeue = sub.add_parser(
        "requeue",
        parents=[connection_options()],
        help="put dead (or gate-rejected) cases back on the training queue",
        description=(
            "Queue dead cases (past NEGCASE_MAX_ATTEMPTS, with their last error) or cases the "
            "validation gate rejected again at their priority, with their attempts reset: "
            "all of them, or only the IDs given. A case that is not in that state is named "
            "and left alone."
        ),
    )
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--dead", action="store_true", help="cases in <ns>:dead")
    which.add_argument("--rejected", action="store_true", help="cases in <ns>:rejected")
    requeue.add_argument("ids", nargs="*", metavar="ID", help="only these case ids")
    requeue.set_defaults(run=run_requeue)


def run_case(args: argparse.Namespace) -> int:
    """Print one case and its state."""
    settings = settings_from(args)
    if not _ID.match(args.id):
        raise CommandError(f"{args.id!r}: not a case id or trade_id")
    client = redis_client(settings)
    found = find_case(client, settings, args.id)
    if found is None:
        raise CommandError(
            f"no case {args.id} (nor one for trade_id {args.id}) in namespace "
            f"{settings.namespace} or in {settings.cases_dir}"
        )
    case, where, partition = found
    state = case_state(
        client, settings, case.case_id, settings.keys.partition(partition, settings.partitions)
    )
    state["stored_in"] = where
    if settings.partitions > 1:
        state["partition"] = partition
    if args.json:
        print(
            orjson.dumps(
                {"case": case.to_dict(), "state": state}, option=orjson.OPT_INDENT_2
            ).decode()
        )
    else:
        print(render_case(case, state))
    return 0


def find_case(
    client: redis.Redis, settings: Settings, given: str
) -> tuple[NegativeCase, str, int] | None:
    """The case with id `given`, or the case of trade `given`, and its partition: from Redis
    (every partition asked in one round trip), else the archive (the partition its symbol
    picks)."""
    parts = settings.partition_keys
    ids = list(dict.fromkeys((given, case_id_for(given))))
    stored = locate(client, parts, ids, lambda pipe, keys, case_id: pipe.exists(keys.case(case_id)))
    for case_id in ids:
        partition = stored.get(case_id)
        case = None if partition is None else CaseStore(client, parts[partition]).get(case_id)
        if case is not None and partition is not None:
            return case, "redis", partition
        path = settings.cases_dir / f"{case_id}.msgpack"
        if path.is_file():
            case = NegativeCase.from_msgpack(path.read_bytes())
            return case, str(path), partition_of(case.symbol, settings.partitions)
    return None


def case_state(client: redis.Redis, settings: Settings, case_id: str, keys: Keys) -> dict[str, Any]:
    """Where a case stands in its partition (`keys`), read in one round trip."""
    pipe = client.pipeline(transaction=True)
    pipe.zscore(keys.queue, case_id)
    pipe.zscore(keys.leased, case_id)
    pipe.hget(keys.leases, case_id)
    pipe.sismember(keys.done, case_id)
    pipe.hget(keys.rejected, case_id)
    pipe.hget(keys.dead, case_id)
    pipe.hget(keys.attempts, case_id)
    pipe.sismember(keys.featureless, case_id)
    queued, deadline_ms, lease, done, rejected, dead, attempts, featureless = pipe.execute()
    state: dict[str, Any] = {"attempts": int(attempts or 0), "held_out": False}
    if queued is not None:
        state |= {"state": "queued", "priority": priority_of_score(queued), "score": queued}
    elif deadline_ms is not None:
        record = msgpack.unpackb(lease, raw=False) if lease else {}
        state |= {
            "state": "leased",
            "worker": record.get("worker"),
            "deadline_ms": int(deadline_ms),
        }
    elif dead is not None:
        state |= {"state": "dead", "last_error": dead.decode("utf-8", "replace")}
    elif rejected is not None:
        state |= {"state": "rejected", "reason": rejected.decode("utf-8", "replace")}
    elif done:
        state["state"] = "done"
    elif featureless:
        state["state"] = "without features"
    else:
        state["state"] = "unknown"
    state["held_out"] = is_held_out(case_id, settings.heldout_share)
    return state


def render_case(case: NegativeCase, state: dict[str, Any]) -> str:
    """The case for people: what happened, what should have, and where it stands."""
    opened = _when(case.opened_at_ms)
    closed = _when(case.closed_at_ms)
    lines = [
        f"case {case.case_id} (trade {case.trade_id}), {_state_text(state)}",
        f"  trade     {case.symbol} {case.side} {case.quantity:g} @ {case.entry_price:g} -> "
        f"{case.exit_price:g}, leverage {case.leverage:g}x, fee rate {case.fee_rate:g}",
        f"  times     opened {opened}, closed {closed}, case created {_when(case.created_at_ms)}",
        f"  loss      {case.loss_percentage:.2f} % of margin (${case.loss_amount:,.2f}); "
        f"move {case.move_pct:+.3f} %",
        f"  lesson    {case.lesson_learned}",
        f"  label     {case.what_should_have_been_done}; priority {case.training_priority}, "
        f"{case.training_epochs} epochs; trained {case.retraining_count} time(s)",
        f"  model     {'v' + str(case.model_version) if case.model_version else 'none named'}"
        + (f", confidence {case.confidence:.2f}" if case.confidence is not None else ""),
        "  features  "
        + (", ".join(f"{v:.4g}" for v in case.features) if case.features else "none (not queued)"),
    ]
    for name in ("market_state_before", "market_state_after", "technical_indicators"):
        value = getattr(case, name)
        if value:
            lines.append(f"  {name.replace('_', ' ')}: {orjson.dumps(value).decode()}")
    if case.tick_data:
        lines.append(f"  tick data: {len(case.tick_data)} ticks")
    if case.extra:
        lines.append(f"  extra: {orjson.dumps(case.extra, default=str).decode()}")
    where = f" (partition {state['partition']})" if "partition" in state else ""
    lines.append(f"  stored in {state['stored_in']}{where}")
    return "\n".join(lines)


def _state_text(state: dict[str, Any]) -> str:
    name = state["state"]
    if name == "queued":
        text = f"queued at priority {state['priority']}"
    elif name == "leased":
        text = f"leased by {state['worker']}"
    elif name == "dead":
        text = f"dead after {state['attempts']} attempts: {state['last_error']}"
    elif name == "rejected":
        text = f"done, update rejected by the gate: {state['reason']}"
    else:
        text = name
    return text + (" (held out: judges models, never trained)" if state["held_out"] else "")


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def run_requeue(args: argparse.Namespace) -> int:
    """Queue dead or rejected cases again, each in its partition."""
    settings = settings_from(args)
    client = redis_client(settings)
    state = "dead" if args.dead else "rejected"
    parts = settings.partition_keys
    if args.ids:
        found = locate(
            client,
            parts,
            args.ids,
            lambda pipe, keys, i: pipe.hexists(_held_in(keys, args.dead), i),
        )
        by_partition = grouped(found, found.__getitem__)
        skipped = [case_id for case_id in args.ids if case_id not in found]
    else:
        by_partition = {
            p: [k.decode() for k, _ in client.hscan_iter(_held_in(keys, args.dead), count=1000)]
            for p, keys in enumerate(parts)
        }
        skipped = []
    queues = CaseQueues.of_settings(client, settings)
    queued = 0
    for partition, ids in by_partition.items():
        store = CaseStore(client, parts[partition])
        for start in range(0, len(ids), REQUEUE_CHUNK):
            cases = store.get_many(ids[start : start + REQUEUE_CHUNK])
            queued += queues.requeue([case for case in cases if case.trainable], partition)
    for case_id in skipped:
        print(f"{case_id}: not {state}, left alone")
    print(f"queued {queued} {state} case(s) again in namespace {settings.namespace}")
    return 1 if skipped else 0


def _held_in(keys: Keys, dead: bool) -> str:
    return keys.dead if dead else keys.rejected
