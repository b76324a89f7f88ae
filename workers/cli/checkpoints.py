"""Commands on the model lineage and the queue: `negcase checkpoints`, `negcase rollback
VERSION`, `negcase retrain-all [--from-archive DIR]`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from negcase.cli.options import (
    CommandError,
    archive_options,
    connection_options,
    redis_client,
    settings_from,
)
from negcase.cli.status_view import before_after
from negcase.runtime.chunks import chunks
from negcase.runtime.settings import Settings
from negcase.schemas.case import NegativeCase
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointInfo, CheckpointMissing, CheckpointRegistry
from negcase.store.keys import Keys, partition_of
from negcase.store.partitions import CaseQueues, grouped
from negcase.store.replication import ReplicaAcksMissing
from negcase.store.serving import ServingState, read_state

REQUEUE_CHUNK = 500
# Cases a chunk at a time, each chunk with the partition its cases belong to.
PartitionChunks = Iterator[tuple[int, list[NegativeCase]]]


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase checkpoints`, `negcase rollback` and `negcase retrain-all`."""
    listing = sub.add_parser(
        "checkpoints",
        parents=[connection_options(), archive_options()],
        help="list checkpoint versions with lineage and metrics",
        description="List every checkpoint (in Redis, or only in the archive's models/ folder) "
        "with its parent, trainer, cases and held-out metrics, and what serving makes of it "
        "(service, canary, earlier); * marks latest. The load column says whether a version "
        "can still be loaded (pinned with `negcase predict --version`, or by `negcase "
        "rollback`): found, and passing every check a hot reload makes for a model configured "
        "as this command is; the reason is printed below for those that fail.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=run_checkpoints)

    rollback = sub.add_parser(
        "rollback",
        parents=[connection_options(), archive_options()],
        help="put VERSION in service and point <ns>:ckpt:latest back at it",
        description="Put a version in service (restored from the archive if Redis no longer "
        "holds it), end any canary, point latest at it and announce it on <ns>:checkpoints, "
        "so inference loads it. Trainers then build on it; versions keep increasing. A "
        "version put in service by hand is not rolled back automatically.",
    )
    rollback.add_argument("version", type=int)
    rollback.set_defaults(run=run_rollback)

    retrain = sub.add_parser(
        "retrain-all",
        parents=[connection_options()],
        help="put every stored case back on the training queue",
        description="Queue every trainable case again at its priority (done, rejected and dead "
        "ones too; leased ones stay with their trainer, held-out ones that are done stay done). "
        "With --from-archive, cases are read from that archive folder and restored into Redis "
        "when it lacks them.",
    )
    retrain.add_argument(
        "--from-archive", type=Path, metavar="DIR", help="archive folder (testcases/negative)"
    )
    retrain.set_defaults(run=run_retrain_all)


def run_checkpoints(args: argparse.Namespace) -> int:
    """Print the lineage table."""
    settings = settings_from(args)
    client = redis_client(settings)
    registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir))
    latest = registry.latest_version()
    infos = registry.list()
    refusals = _refusals(registry, infos, settings)
    roles = _roles(read_state(client, settings.keys))
    if args.json:
        rows = [_json_row(info, latest, refusals.get(info.version), roles) for info in infos]
        print(
            orjson.dumps(
                {"latest": latest, "checkpoints": rows}, option=orjson.OPT_INDENT_2
            ).decode()
        )
        return 0
    if not infos:
        print("no checkpoints yet")
        return 0
    print(
        f"{'':1} {'version':>7} {'parent':>6} {'created':19} {'cases':>5} "
        f"{'held-out loss':>17} {'held-out acc':>15} {'where':6} {'load':4} {'serving':8} "
        "trainer"
    )
    for info in infos:
        print(_row(info, latest, info.version not in refusals, roles))
    for version, reason in refusals.items():
        print(f"v{version} cannot be loaded: {reason}")
    return 0


def _refusals(
    registry: CheckpointRegistry, infos: list[CheckpointInfo], settings: Settings
) -> dict[int, str]:
    """Why each version that cannot be loaded (found, and passing every check of a hot
    reload for a model configured as this command is) cannot be."""
    # torch comes with these: imported here so that `negcase --help` does without it.
    from negcase.processes.model import CheckpointError, spec_from_settings
    from negcase.processes.reloader import load_version

    spec = spec_from_settings(settings)
    refusals = {}
    for info in infos:
        try:
            load_version(registry, info.version, spec, settings.feature_count)
        except CheckpointError as error:
            refusals[info.version] = error.reason
    return refusals


def _roles(state: ServingState) -> dict[int, str]:
    """What serving makes of each version it names: in service, canary, or earlier."""
    roles = dict.fromkeys(state.history, "earlier")
    if state.canary is not None:
        roles[state.canary] = "canary"
    if state.service is not None:
        roles[state.service] = "service"
    return roles


def _json_row(
    info: CheckpointInfo, latest: int | None, refusal: str | None, roles: dict[int, str]
) -> dict[str, Any]:
    meta = info.meta
    return {
        "version": info.version,
        "latest": info.version == latest,
        "serving": roles.get(info.version),
        "parent_version": meta.get("parent_version"),
        "created_at_ms": meta.get("created_at_ms"),
        "trainer": meta.get("trainer"),
        "case_ids": meta.get("case_ids") or [],
        "metrics": meta.get("metrics") or {},
        "sha256": info.sha256,
        "where": "redis" if info.in_redis else "disk",
        "loadable": refusal is None,
        "refused": refusal,
    }


def _row(info: CheckpointInfo, latest: int | None, loadable: bool, roles: dict[int, str]) -> str:
    meta = info.meta
    metrics = meta.get("metrics") or {}
    before, after = metrics.get("heldout_before"), metrics.get("heldout_after")
    created = time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(meta.get("created_at_ms", 0) / 1000)
    )
    parent = meta.get("parent_version")
    loss = before_after(before, after, "loss", "{:.4f}", missing="n/a", arrow="->")
    accuracy = before_after(before, after, "accuracy", "{:.1%}", missing="n/a", arrow="->")
    return (
        f"{'*' if info.version == latest else ' '} {info.version:>7} "
        f"{'-' if parent is None else parent:>6} {created:19} {len(meta.get('case_ids', [])):>5} "
        f"{loss:>17} {accuracy:>15} "
        f"{'redis' if info.in_redis else 'disk':6} {'yes' if loadable else 'no':4} "
        f"{roles.get(info.version, '-'):8} "
        f"{meta.get('trainer', '')}"
    )


def run_rollback(args: argparse.Namespace) -> int:
    """Put a version in service and move latest back to it."""
    settings = settings_from(args)
    client = redis_client(settings)
    registry = CheckpointRegistry(
        client,
        settings.keys,
        Archive(settings.data_dir),
        settings.keep_checkpoints,
        settings.events_maxlen,
        settings.replica_acks,
    )
    state = read_state(client, settings.keys)
    if (state.service, state.latest, state.canary) == (args.version, args.version, None):
        # Nothing to roll back: announcing it would make every inference worker log a reload.
        print(f"v{args.version} is already in service and latest, with no canary: nothing to do")
        return 0
    try:
        previous = registry.rollback(args.version)
    except CheckpointMissing as error:
        raise CommandError(str(error)) from None
    except ReplicaAcksMissing as error:
        raise CommandError(f"rolled back to v{args.version}, unconfirmed: {error}") from None
    ended = "" if state.canary is None else f", canary v{state.canary} ended"
    print(
        f"in service: v{state.service} -> v{args.version}, latest: v{previous} -> "
        f"v{args.version}{ended} (announced on {settings.keys.checkpoints})"
    )
    return 0


def run_retrain_all(args: argparse.Namespace) -> int:
    """Requeue every stored (or archived) trainable case, each in its partition."""
    settings = settings_from(args)
    client = redis_client(settings)
    queues = CaseQueues.of_settings(client, settings)
    if args.from_archive:
        if not args.from_archive.is_dir():
            raise CommandError(f"{args.from_archive}: no such archive folder")
        found = _archived_cases(args.from_archive, settings.partitions)
    else:
        found = _stored_cases(client, settings.partition_keys)
    queued = skipped = 0
    for partition, cases in found:
        trainable = [case for case in cases if case.trainable]
        skipped += len(cases) - len(trainable)
        queued += queues.requeue(trainable, partition, restore=bool(args.from_archive))
    print(
        f"queued {queued} cases ({skipped} without features skipped); now "
        + ", ".join(f"{name} {count}" for name, count in queues.counts().items())
    )
    return 0


def _stored_cases(client: redis.Redis, parts: list[Keys]) -> PartitionChunks:
    """Every case Redis holds, a chunk at a time, with the partition that holds it."""
    for partition, keys in enumerate(parts):
        store = CaseStore(client, keys)
        ids = (case_id.decode() for case_id in client.sscan_iter(keys.cases, count=REQUEUE_CHUNK))
        for chunk in chunks(ids, REQUEUE_CHUNK):
            yield partition, store.get_many(chunk)


def _archived_cases(folder: Path, partitions: int) -> PartitionChunks:
    """Every archived case, a chunk at a time, with the partition its symbol picks."""
    for chunk in chunks(Archive(folder).iter_cases(), REQUEUE_CHUNK):
        yield from grouped(chunk, lambda case: partition_of(case.symbol, partitions)).items()
