"""Replica acknowledgement: after a write that must outlive its primary (a detector's batch,
a checkpoint publish), `WAIT` until replicas confirm it.

WAIT counts what replicas acknowledged of the writes made *on the connection that sends
it*, so the script and its WAIT travel in one pipeline: one connection, one round trip. In a
Cluster the pipeline goes to the node that owns the script's slot (redis-py sends a bare WAIT
to every primary and adds up the replies, which says nothing about this write).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import MovedError

from negcase.store.connection import Client, server_of


class ReplicaAcksMissing(redis.ConnectionError):
    """Fewer replicas than required confirmed a write in time. The write stands on the
    primary, but a failover could lose it: callers treat it like a lost connection (back off,
    go on) and do not report the write as done; a trainer gives its cases back."""


@dataclass(frozen=True, slots=True)
class ReplicaAcks:
    """How many replicas must acknowledge a write (0: none, Redis's default asynchronous
    replication) and how long to wait for them."""

    count: int = 0
    timeout_ms: int = 1000

    def run_script(
        self, client: Client, script: Script, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """The reply of `script`; with `count` > 0, returned only once `count` replicas have
        its writes. ReplicaAcksMissing when they did not within `timeout_ms`: the write
        stands (WAIT cannot undo it), unconfirmed."""
        if self.count == 0:
            return script(keys=keys, args=args)
        try:
            reply, acked = self._script_then_wait(client, script, keys, args)
        except MovedError:
            # Only a Cluster answers MOVED: the slot went to another node (resharding).
            # Learn the new map and try once more; the script did not run.
            client.nodes_manager.initialize()  # type: ignore[union-attr]
            reply, acked = self._script_then_wait(client, script, keys, args)
        if acked < self.count:
            raise ReplicaAcksMissing(
                f"only {acked} of {self.count} replicas acknowledged the write to {keys[0]} "
                f"within {self.timeout_ms} ms; it stands on the primary, unconfirmed"
            )
        return reply

    def _script_then_wait(
        self, client: Client, script: Script, keys: Sequence[Any], args: Sequence[Any]
    ) -> tuple[Any, int]:
        pipe = server_of(client, keys[0]).pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", self.count, self.timeout_ms)
        reply, acked = pipe.execute()
        return reply, int(acked)


NO_ACKS = ReplicaAcks()
