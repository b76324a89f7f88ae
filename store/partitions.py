"""The case queues of every partition, used as one (README, "Partitions"): a claim takes the
best case across partitions by looking only at the head of each partition's queue, and
every later step of a lease goes to the partition it came from.

With one partition this is the namespace's own queue, called exactly as CaseQueue is.
With more, a publish cannot finish its cases in the lineage's script (another slot): the
lineage keeps `learned`; a case a published checkpoint already learned (its trainer died
between that publish and its ack) is finished by the reaper when its lease lapses, or by a
claim that meets it queued, never trained again."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import redis
from redis.client import Pipeline

from negcase.runtime.settings import Settings
from negcase.schemas.case import NegativeCase
from negcase.store.keys import Keys
from negcase.store.leases import Lease
from negcase.store.queue import CaseQueue, queue_counts

T = TypeVar("T")


# How far past now the reaper's "learned" read looks (see _learned_among_leased).
REAP_MARGIN_MS = 5_000


class CaseQueues:
    """One CaseQueue per partition (`queues[p]` has partition p's keys), and a queue on the
    namespace's own keys for what lives there (open sessions, `learned`)."""

    def __init__(self, client: redis.Redis, home: CaseQueue, queues: Sequence[CaseQueue]) -> None:
        self.client = client
        self.keys = home.keys
        self._home = home
        self.queues = list(queues)

    @classmethod
    def of(
        cls,
        client: redis.Redis,
        keys: Keys,
        partitions: int,
        lease_s: float = 30.0,
        max_attempts: int = 3,
        events_maxlen: int = 100_000,
        heldout_share: float = 0.0,
    ) -> CaseQueues:
        """The queues of `partitions` partitions of the namespace `keys`."""
        queues = [
            CaseQueue(client, part, lease_s, max_attempts, events_maxlen, heldout_share)
            for part in keys.partitioned(partitions)
        ]
        home = queues[0] if len(queues) == 1 else CaseQueue(client, keys, lease_s)
        return cls(client, home, queues)

    @classmethod
    def of_settings(cls, client: redis.Redis, settings: Settings) -> CaseQueues:
        """The queues of the deployment `settings` describes (its namespace, partitions,
        leases, attempts and held-out share)."""
        return cls.of(
            client,
            settings.keys,
            settings.partitions,
            settings.lease_s,
            settings.max_attempts,
            settings.events_maxlen,
            settings.heldout_share,
        )

    @property
    def partitioned(self) -> bool:
        """Whether there is more than one partition."""
        return len(self.queues) > 1

    def claim(self, worker: str, count: int = 1) -> list[Lease]:
        """Lease up to `count` of the best cases of the partition whose best queued case is
        the best of all (the head of each queue, one pipeline); the next partition when those
        were taken meanwhile. Every lease names its partition."""
        if not self.partitioned:
            return self.queues[0].claim(worker, count)
        for partition in self._by_head_score():
            leases = self._claim_unlearned(partition, worker, count)
            if leases:
                return leases
        return []

    def heartbeat(self, leases: Sequence[Lease], session_id: str = "") -> list[str]:
        """Extend the leases in their partitions and the open session in the namespace;
        returns the ids of the leases no longer held."""
        if not self.partitioned:
            return self.queues[0].heartbeat(leases, session_id)
        lost = [
            case_id
            for partition, held in by_partition(leases).items()
            for case_id in self.queues[partition].heartbeat(held)
        ]
        if session_id:
            self._home.heartbeat([], session_id)
        return lost

    def ack(
        self,
        leases: Sequence[Lease],
        blobs: Mapping[str, bytes] | None = None,
        rejected_reason: str | None = None,
    ) -> None:
        """Mark the leased cases done in their partitions (all or none within a partition;
        a claim takes from one). Raises LeaseLost."""
        for partition, held in by_partition(leases).items():
            self.queues[partition].ack(held, blobs, rejected_reason)

    def fail(self, leases: Sequence[Lease], error: str, worker: str) -> dict[str, str]:
        """CaseQueue.fail, in each lease's partition."""
        outcome: dict[str, str] = {}
        for partition, held in by_partition(leases).items():
            outcome |= self.queues[partition].fail(held, error, worker)
        return outcome

    def release(self, leases: Sequence[Lease], worker: str) -> dict[str, str]:
        """CaseQueue.release, in each lease's partition."""
        outcome: dict[str, str] = {}
        for partition, held in by_partition(leases).items():
            outcome |= self.queues[partition].release(held, worker)
        return outcome

    def reap(self, limit: int = 100) -> int:
        """Return up to `limit` expired leases per partition to its queue (or dead set);
        a case `learned` holds is finished instead, so one whose update was published never
        ends dead for its lapsed lease."""
        if not self.partitioned:
            return self.queues[0].reap(limit)
        learned = self._learned_among_leased(limit)
        return sum(queue.reap(limit, learned[p]) for p, queue in enumerate(self.queues))

    def _learned_among_leased(self, limit: int) -> list[list[str]]:
        """Per partition, which leases due by now plus REAP_MARGIN_MS (at most `limit`: those
        a reap may take) are of cases `learned` holds. The margin covers the time until the
        reap runs and the skew between this node's clock and the partition's; a lease named
        but not yet expired is left alone by the reap. Cheap when none is due: one TIME and
        one pipeline."""
        seconds, micros = self.client.time()
        due_ms = seconds * 1000 + micros // 1000 + REAP_MARGIN_MS
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.zrangebyscore(queue.keys.leased, "-inf", due_ms, start=0, num=limit)
        due = [[case_id.decode() for case_id in ids] for ids in pipe.execute()]
        if not any(due):
            return due
        pipe = self.client.pipeline(transaction=False)
        for ids in due:
            for case_id in ids:
                pipe.zscore(self.keys.learned, case_id)
        scores = iter(pipe.execute())
        return [[case_id for case_id in ids if next(scores) is not None] for ids in due]

    def requeue(self, cases: Sequence[NegativeCase], partition: int, restore: bool = False) -> int:
        """CaseQueue.requeue in `partition`; the cases may be published again (they leave
        `learned`)."""
        if self.partitioned and cases:
            self.client.zrem(self.keys.learned, *(case.case_id for case in cases))
        return self.queues[partition].requeue(cases, restore)

    def counts(self) -> dict[str, int]:
        """queue_counts summed over the partitions."""
        return sum_counts(queue_counts(self.client, queue.keys) for queue in self.queues)

    def _by_head_score(self) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.zrevrange(queue.keys.queue, 0, 0, withscores=True)
        heads = [(head[0][1], p) for p, head in enumerate(pipe.execute()) if head]
        return [partition for _, partition in sorted(heads, reverse=True)]

    def _claim_unlearned(self, partition: int, worker: str, count: int) -> list[Lease]:
        """Claim in one partition; a claimed case that `learned` holds is finished there at
        once (its update is in the lineage) and not handed out."""
        queue = self.queues[partition]
        while True:
            claimed = [
                dataclasses.replace(lease, partition=partition)
                for lease in queue.claim(worker, count)
            ]
            if not claimed:
                return []
            pipe = self.client.pipeline(transaction=False)
            for lease in claimed:
                pipe.zscore(self.keys.learned, lease.case_id)
            learned = [score is not None for score in pipe.execute()]
            fresh = [lease for lease, done in zip(claimed, learned, strict=True) if not done]
            if len(fresh) < len(claimed):
                queue.ack([lease for lease in claimed if lease not in fresh])
            if fresh:
                return fresh


def sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Counts added up field by field."""
    total: dict[str, int] = defaultdict(int)
    for one in counts:
        for name, value in one.items():
            total[name] += value
    return dict(total)


def by_partition(leases: Sequence[Lease]) -> dict[int, list[Lease]]:
    """The leases grouped by the partition they came from."""
    return grouped(leases, lambda lease: lease.partition)


def locate(
    client: redis.Redis,
    parts: Sequence[Keys],
    ids: Sequence[str],
    holds: Callable[[Pipeline, Keys, str], object],
) -> dict[str, int]:
    """The partition (index into `parts`) that holds each of `ids`, where `holds(pipe, keys,
    id)` queues a read that answers truthy: a case id does not name its partition, so every
    partition is asked, in one pipeline. An id no partition holds is left out."""
    pipe = client.pipeline(transaction=False)
    for part in parts:
        for one in ids:
            holds(pipe, part, one)
    replies = iter(pipe.execute())
    found: dict[str, int] = {}
    for index in range(len(parts)):
        for one in ids:
            if next(replies) and one not in found:
                found[one] = index
    return found


def grouped(items: Iterable[T], partition_of_item: Callable[[T], int]) -> dict[int, list[T]]:
    """The items grouped by the partition `partition_of_item` names, in partition order."""
    groups: dict[int, list[T]] = defaultdict(list)
    for item in items:
        groups[partition_of_item(item)].append(item)
    return dict(sorted(groups.items()))
