"""Leases: a claimed case's proof of ownership, what losing it raises, and the fencing
arguments every lease script takes. The rule that says whether a lease holds is lease.lua,
shared by the scripts that check it (claim, heartbeat, ack, give_back, reap, publish)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed case: the fencing token that proves it is ours, and when the lease ends."""

    case_id: str
    token: int
    attempts: int
    score: float
    deadline_ms: int
    partition: int = 0  # which partition's queue it came from (store/partitions.py)


class LeaseLost(Exception):
    """A lease expired or was taken over: its holder may not ack, publish or give it back."""

    def __init__(self, case_id: str) -> None:
        super().__init__(f"lease on {case_id} is no longer held")
        self.case_id = case_id


def fence_args(leases: Sequence[Lease]) -> list[str | int]:
    """Script arguments that prove ownership: case_id, fencing token, per lease."""
    return [part for lease in leases for part in (lease.case_id, lease.token)]
