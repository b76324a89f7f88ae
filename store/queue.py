"""The case queue: a sorted set where the best case to train next has the highest score, and
the leases that let any number of trainers share it safely (DESIGN.md, "The case queue")."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import redis

from negcase.schemas.case import NegativeCase
from negcase.store.keys import Keys
from negcase.store.leases import Lease, LeaseLost, fence_args
from negcase.store.scripts import script

# Score layout (higher is claimed first), exact in a double's 53-bit mantissa:
#   priority * 100_000  +  loss in tenths of a percent (capped)  +  an age fraction in [0, 1)
# where older cases get the larger fraction. So `ZREVRANGE queue 0 0` is the next case, and
# a score like 300123.58 reads as "priority 3, loss 12.3 %".
_PRIORITY_UNIT = 100_000
_MAX_LOSS_TENTHS = _PRIORITY_UNIT - 1
_AGE_SPAN_S = 2**32  # seconds since the Unix epoch fit until 2106; resolution about 0.5 s


def queue_score(priority: int, loss_pct: float, created_at_ms: int) -> float:
    """The queue score: priority first, then loss size, then age (older first)."""
    loss_tenths = int(min(_MAX_LOSS_TENTHS, max(0.0, loss_pct * 10)))
    age_fraction = 1.0 - (created_at_ms / 1000.0) / _AGE_SPAN_S
    return priority * _PRIORITY_UNIT + loss_tenths + age_fraction


# Held-out cases (DESIGN.md, "Training"): a fixed rule on the case id alone, the same in every
# process and in the Lua scripts, so no list has to be agreed on. A case is held out when the
# first 32 bits of the SHA-1 of its id fall below share * 2^32. It is never trained: claim.lua
# moves it from the queue straight to done (counted in <ns>:stats cases_held_out).
_HASH_SPACE = 2**32
HELD_OUT_STAT = "cases_held_out"


def heldout_threshold(share: float) -> int:
    """Ids whose hash is below this are held out: about `share` of all case ids."""
    return int(min(1.0, max(0.0, share)) * _HASH_SPACE)


def id_hash(case_id: str) -> int:
    """The first 32 bits of the id's SHA-1: what claim.lua reads from redis.sha1hex."""
    return int(hashlib.sha1(case_id.encode()).hexdigest()[:8], 16)


def is_held_out(case_id: str, share: float) -> bool:
    """Whether a case is held out (measured on, never trained) at this held-out share."""
    return id_hash(case_id) < heldout_threshold(share)


def priority_of_score(score: float) -> int:
    """The priority a queue score was built from."""
    return int(score // _PRIORITY_UNIT)


def score_range(priority: int) -> tuple[float, str]:
    """ZCOUNT/ZRANGEBYSCORE bounds (min, exclusive max) of one priority's scores."""
    return priority * _PRIORITY_UNIT, f"({(priority + 1) * _PRIORITY_UNIT}"


class CaseQueue:
    """The training queue with leases: claim, heartbeat, ack, fail, release, reap. With a
    `heldout_share`, held-out cases are never leased: a claim that meets one marks it done."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        lease_s: float = 30.0,
        max_attempts: int = 3,
        events_maxlen: int = 100_000,
        heldout_share: float = 0.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.lease_ms = max(1, int(lease_s * 1000))
        self.max_attempts = max_attempts
        self.events_maxlen = events_maxlen
        self.heldout_threshold = heldout_threshold(heldout_share)
        self._claim = script(client, "claim", "clock", "held_out")
        self._heartbeat = script(client, "heartbeat", "clock", "lease")
        self._ack = script(client, "ack", "clock", "lease")
        self._give_back = script(client, "give_back", "clock", "lease")
        self._reap = script(client, "reap", "clock", "lease")
        self._requeue = script(client, "requeue", "held_out")

    def claim(self, worker: str, count: int = 1) -> list[Lease]:
        """Lease the best `count` queued cases that are not held out (fewer when the queue
        holds fewer); held-out cases met on the way go to done untrained."""
        keys = self.keys
        flat = self._claim(
            keys=[
                keys.queue,
                keys.leased,
                keys.leases,
                keys.fencing,
                keys.attempts,
                keys.done,
                keys.stats,
                keys.retire,
            ],
            args=[worker, self.lease_ms, count, self.heldout_threshold, HELD_OUT_STAT],
        )
        return [
            Lease(
                case_id=flat[i].decode(),
                token=int(flat[i + 1]),
                attempts=int(flat[i + 2]),
                score=float(flat[i + 3]),
                deadline_ms=int(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        ]

    def heartbeat(self, leases: Sequence[Lease], session_id: str = "") -> list[str]:
        """Extend the leases, and the open session they are trained in, by lease_s; returns
        the ids of the leases no longer held."""
        if not leases and not session_id:
            return []
        keys = self.keys
        lost = self._heartbeat(
            keys=[keys.leased, keys.leases, keys.open_sessions],
            args=[self.lease_ms, session_id, *fence_args(leases)],
        )
        return [case_id.decode() for case_id in lost]

    def ack(
        self,
        leases: Sequence[Lease],
        blobs: Mapping[str, bytes] | None = None,
        rejected_reason: str | None = None,
    ) -> None:
        """Mark the leased cases done, all or none, storing their updated `blobs` and the
        gate's `rejected_reason` if it refused the update. Raises LeaseLost."""
        blobs = blobs or {}
        keys = self.keys
        args: list[str | int | bytes] = [rejected_reason or ""]
        for lease in leases:
            args += [lease.case_id, lease.token, blobs.get(lease.case_id, b"")]
        status, detail = self._ack(
            keys=[
                keys.leased,
                keys.leases,
                keys.done,
                keys.attempts,
                keys.rejected,
                keys.retire,
                *(keys.case(lease.case_id) for lease in leases),
            ],
            args=args,
        )
        if status == b"fenced":
            raise LeaseLost(detail.decode())

    def fail(self, leases: Sequence[Lease], error: str, worker: str) -> dict[str, str]:
        """Count a failed attempt: back on the queue, or dead past max_attempts with `error`.
        Returns case_id -> 'queued' | 'dead' | 'fenced' (no longer ours)."""
        return self._give_back_leases(leases, counted=True, error=error, worker=worker)

    def release(self, leases: Sequence[Lease], worker: str) -> dict[str, str]:
        """Hand leases back untouched (a worker shutting down): no attempt is counted."""
        return self._give_back_leases(leases, counted=False, error="", worker=worker)

    def reap(self, limit: int = 100, learned: Sequence[str] = ()) -> int:
        """Return up to `limit` expired leases to the queue (or the dead set); those of
        `learned` cases (a published checkpoint has their update) are finished instead."""
        keys = self.keys
        return int(
            self._reap(
                keys=[
                    keys.queue,
                    keys.leased,
                    keys.leases,
                    keys.attempts,
                    keys.dead,
                    keys.events,
                    keys.retire,
                    keys.done,
                    keys.rejected,
                ],
                args=[self.max_attempts, self.events_maxlen, limit, *learned],
            )
        )

    def requeue(self, cases: Sequence[NegativeCase], restore: bool = False) -> int:
        """Put cases back on the queue at their priority, unless leased right now or held
        out and already done; with `restore`, store each case (if Redis lacks it) first.
        Returns how many were queued."""
        keys = self.keys
        args: list[str | int | bytes] = [self.heldout_threshold]
        for case in cases:
            score = queue_score(case.training_priority, case.loss_percentage, case.created_at_ms)
            args += [case.case_id, repr(score), case.to_msgpack() if restore else b""]
        return int(
            self._requeue(
                keys=[
                    keys.queue,
                    keys.leased,
                    keys.done,
                    keys.dead,
                    keys.rejected,
                    keys.attempts,
                    keys.cases,
                    keys.retire,
                    *(keys.case(case.case_id) for case in cases),
                ],
                args=args,
            )
        )

    def _give_back_leases(
        self, leases: Sequence[Lease], counted: bool, error: str, worker: str
    ) -> dict[str, str]:
        if not leases:
            return {}
        keys = self.keys
        flat = self._give_back(
            keys=[
                keys.queue,
                keys.leased,
                keys.leases,
                keys.attempts,
                keys.dead,
                keys.events,
                keys.retire,
            ],
            args=[
                self.max_attempts,
                self.events_maxlen,
                "1" if counted else "0",
                error[:2000],
                worker,
                *fence_args(leases),
            ],
        )
        return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


def queue_counts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """One consistent snapshot: queued + leased + done + dead == total. Rejected and
    held_out are parts of done: rejected cases were trained but the gate refused to publish
    the result; held-out cases were never trained (they judge the models)."""
    pipe = client.pipeline(transaction=True)
    pipe.zcard(keys.queue)
    pipe.zcard(keys.leased)
    pipe.scard(keys.done)
    pipe.hlen(keys.dead)
    pipe.hlen(keys.rejected)
    pipe.hget(keys.stats, HELD_OUT_STAT)
    pipe.scard(keys.cases)
    queued, leased, done, dead, rejected, held_out, total = pipe.execute()
    return {
        "queued": queued,
        "leased": leased,
        "done": done,
        "dead": dead,
        "rejected": rejected,
        "held_out": int(held_out or 0),
        "total": total,
    }
