"""Signal requests and replies in Redis: the `inference` group on `<ns>:signals:requests`,
reply lists `<ns>:signals:reply:<request_id>`, and `<ns>:signals:dead`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import redis

from negcase.store.keys import INFERENCE_GROUP, Keys
from negcase.store.scripts import script
from negcase.store.streams import Entry, claim_abandoned, entries_of, packed_dead_letter


@dataclass(slots=True)
class DeadRequest:
    """A request that cannot be answered because it has no usable request_id."""

    entry_id: bytes
    fields: Mapping[bytes, bytes]
    field: str
    reason: str


@dataclass(slots=True)
class ReplyBatch:
    """What one batch of requests produced, written by `SignalStore.write` in one script call."""

    replies: list[tuple[str, bytes]] = field(default_factory=list)
    dead: list[DeadRequest] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    handled_ids: list[bytes] = field(default_factory=list)

    def count(self, name: str, by: int = 1) -> None:
        """Add to a stats counter."""
        if by:
            self.counters[name] = self.counters.get(name, 0) + by


class SignalStore:
    """The inference side of the request stream: read, answer, acknowledge, delete."""

    def __init__(self, client: redis.Redis, keys: Keys, reply_ttl_s: int, dead_maxlen: int) -> None:
        self.client = client
        self.keys = keys
        self.reply_ttl_s = reply_ttl_s
        self.dead_maxlen = dead_maxlen
        self._reply_batch = script(client, "reply_batch")

    def ensure_group(self) -> None:
        """Create the `inference` group (and the stream) if they do not exist yet."""
        try:
            self.client.xgroup_create(self.keys.requests, INFERENCE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def read_new(self, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` requests no worker has read yet, waiting up to `block_ms` for one."""
        reply = self.client.xreadgroup(
            INFERENCE_GROUP, consumer, {self.keys.requests: ">"}, count=count, block=block_ms
        )
        return entries_of(reply)

    def claim_abandoned(self, consumer: str, min_idle_ms: int, count: int) -> Iterator[list[Entry]]:
        """Pages of requests another worker read but never answered (see
        store.streams.claim_abandoned); the caller answers each page before the next."""
        return claim_abandoned(
            self.client, self.keys.requests, INFERENCE_GROUP, consumer, min_idle_ms, count
        )

    def pending(self) -> int:
        """Requests read by some worker and not answered yet."""
        summary = self.client.xpending(self.keys.requests, INFERENCE_GROUP)
        return int(summary["pending"]) if summary else 0

    def write(self, batch: ReplyBatch) -> None:
        """Every reply, dead request and counter of a batch, then XACK + XDEL, in one script
        call. XDEL keeps the stream as long as the backlog: an answered request is of no
        further use, and its reply list expires after reply_ttl_s if nobody pops it."""
        keys = self.keys
        args: list[bytes | str | int] = [
            INFERENCE_GROUP,
            self.reply_ttl_s,
            self.dead_maxlen,
            len(batch.dead),
            len(batch.counters),
            len(batch.handled_ids),
        ]
        args += [reply for _, reply in batch.replies]
        args += [
            packed_dead_letter(dead.fields, dead.field, dead.reason, entry_id=dead.entry_id)
            for dead in batch.dead
        ]
        for name, by in batch.counters.items():
            args += [name, by]
        args += batch.handled_ids
        reply_keys = [keys.reply(request_id) for request_id, _ in batch.replies]
        self._reply_batch(
            keys=[keys.requests, keys.stats, keys.requests_dead, *reply_keys], args=args
        )
