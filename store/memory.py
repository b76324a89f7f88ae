"""What holds Redis memory: `used_memory`, and an estimate per key family, read cheaply
enough for `negcase status` to run every few seconds on a Redis holding millions of keys.

How each figure is measured (the `how` of each row):
- a family of a few keys (streams, the queue, the indexes): MEMORY USAGE of each key, which
  for an aggregate samples 5 of its elements (Redis's default) and scales up;
- a family of one key per id (case blobs, session records, checkpoints, live windows): its
  key count (from the index that lists them) times the mean MEMORY USAGE of up to
  SAMPLE_KEYS keys drawn at random (all of them when there are no more).
INFO memory and two pipelines, whatever the sizes; on a Cluster, INFO's figures are summed
over its nodes. With partitions, each family is added up over the namespace and every
partition (a family absent from one of them counts nothing there).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline

from negcase.store.keys import Keys

SAMPLE_KEYS = 8
_ONE_KEY = "MEMORY USAGE"
_SAMPLED = f"count x mean MEMORY USAGE of {SAMPLE_KEYS} sampled keys"


def _key_families(keys: Keys) -> dict[str, list[str]]:
    """Families measured key by key."""
    return {
        "trades stream": [keys.trades],
        "dead letters": [keys.trades_dead, keys.requests_dead],
        "events": [keys.events],
        "checkpoint announcements": [keys.checkpoints],
        "signal requests": [keys.requests],
        "queue and leases": [keys.queue, keys.leased, keys.leases, keys.attempts],
        "finished-case indexes": [
            keys.cases,
            keys.featureless,
            keys.done,
            keys.rejected,
            keys.dead,
            keys.retire,
        ],
        "idempotency record": [keys.seen],
        "outcomes (replay, validation)": [keys.outcomes, keys.validation],
        "serving and live scores": [
            keys.serving,
            keys.serving_history,
            keys.serving_refused,
            keys.live_versions,
            keys.live_seen,
        ],
        "session indexes": [keys.sessions, keys.open_sessions],
        "counters": [keys.stats, keys.workers],
    }


def memory_report(client: redis.Redis, keys: Keys, partitions: int = 1) -> dict[str, Any]:
    """Redis's memory figures and the estimated bytes each key family holds, summed over the
    namespace and its partitions."""
    info = _memory_info(client)
    spaces = keys.with_partitions(partitions)
    pipe = client.pipeline(transaction=False)
    spans = []  # each namespace's replies: what its _count_reads queued, however many
    for one in spaces:
        start = len(pipe)
        _count_reads(pipe, one)
        spans.append(slice(start, len(pipe)))
    replies = pipe.execute()
    # family -> (how many keys it has, the keys measured), added up over the namespaces
    measured: dict[str, tuple[int, list[str]]] = {}
    for one, span in zip(spaces, spans, strict=True):
        own = _measured(one, replies[span])
        for family, (count, names) in own.items():
            before_count, before_names = measured.get(family, (0, []))
            measured[family] = (before_count + count, before_names + names)
    pipe = client.pipeline(transaction=False)
    for _, names in measured.values():
        for name in names:
            pipe.memory_usage(name)
    sizes = iter(pipe.execute())
    families = {}
    for family, (count, names) in measured.items():
        found = [next(sizes) or 0 for _ in names]
        if len(names) == count:
            existing = sum(1 for size in found if size)
            families[family] = {"keys": existing, "bytes": sum(found), "how": _ONE_KEY}
        else:
            mean = sum(found) / len(found) if found else 0
            families[family] = {"keys": count, "bytes": round(count * mean), "how": _SAMPLED}
    return {
        "nodes": info["nodes"],
        "used_memory_bytes": info["used_memory"],
        "used_memory_dataset_bytes": info.get("used_memory_dataset"),
        "maxmemory_bytes": info.get("maxmemory", 0),
        "accounted_bytes": sum(row["bytes"] for row in families.values()),
        "families": dict(sorted(families.items(), key=lambda item: -item[1]["bytes"])),
    }


def _count_reads(pipe: Pipeline, keys: Keys) -> None:
    """Queue the reads that count and sample the per-id families of `keys` (_measured
    reads their replies in this order)."""
    pipe.scard(keys.cases)
    pipe.scard(keys.featureless)
    pipe.srandmember(keys.cases, SAMPLE_KEYS)
    pipe.srandmember(keys.featureless, SAMPLE_KEYS)
    pipe.zcard(keys.sessions)
    pipe.zrandmember(keys.sessions, SAMPLE_KEYS)
    pipe.zrange(keys.versions, 0, -1)
    pipe.zrange(keys.live_versions, 0, -1)


def _measured(keys: Keys, replies: list[Any]) -> dict[str, tuple[int, list[str]]]:
    """Family -> (how many keys it has, the keys to measure) of one namespace."""
    n_cases, n_featureless, case_ids, featureless_ids, n_sessions, session_ids = replies[:6]
    versions, live_versions = replies[6:]
    measured: dict[str, tuple[int, list[str]]] = {
        family: (len(names), names) for family, names in _key_families(keys).items()
    }
    sampled_cases = [*(case_ids or []), *(featureless_ids or [])]
    measured["case blobs"] = (
        n_cases + n_featureless,
        [keys.case(i.decode()) for i in sampled_cases],
    )
    measured["session records"] = (
        n_sessions,
        [keys.session(i.decode()) for i in session_ids or []],
    )
    measured["checkpoints"] = (len(versions), [keys.checkpoint(int(v)) for v in versions])
    measured["live windows"] = (len(live_versions), [keys.live(int(v)) for v in live_versions])
    return measured


def _memory_info(client: redis.Redis) -> dict[str, Any]:
    """INFO memory's figures. A Cluster client answers per node (INFO cannot go in a
    cluster pipeline either): the figures are then summed over the nodes."""
    info = client.info("memory")
    per_node = [info] if "used_memory" in info else list(info.values())
    return {
        "nodes": len(per_node),
        **{
            name: sum(node.get(name) or 0 for node in per_node)
            for name in ("used_memory", "used_memory_dataset", "maxmemory")
        },
    }
