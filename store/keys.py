"""Every Redis key negcase uses, built from the namespace in one place."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

DETECTOR_GROUP = "detectors"
INFERENCE_GROUP = "inference"


def partition_of(symbol: str, partitions: int) -> int:
    """The partition a trade of `symbol` goes to: CRC-32 (zlib's, the IEEE polynomial) of the
    symbol's UTF-8 bytes, mod the partition count. Every trade of one symbol lands in one
    partition, so its trades stay in order; producers in other languages use the same rule."""
    if partitions <= 1:
        return 0
    return zlib.crc32(symbol.encode("utf-8")) % partitions


def partition_namespace(namespace: str, index: int) -> str:
    """The namespace partition `index` builds its keys under: `:p<index>` added inside the
    namespace's hash tag (`{negcase}` -> `{negcase:p1}`), so each partition has a Cluster slot
    of its own, or at the end of a namespace without one (`negcase` -> `negcase:p1`)."""
    opening = namespace.find("{")
    closing = namespace.find("}", opening + 1) if opening >= 0 else -1
    if closing > opening + 1:
        return f"{namespace[:closing]}:p{index}{namespace[closing:]}"
    return f"{namespace}:p{index}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace (`negcase`, or a hash tag like `{negcase}` for Cluster)."""

    namespace: str = "negcase"

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def partition(self, index: int, partitions: int) -> Keys:
        """The keys of partition `index` of `partitions`: the trades stream, the case queue
        and their companions (README, "Partitions"). With one partition they are this
        namespace's own keys, today's layout unchanged."""
        if partitions <= 1:
            return self
        if not 0 <= index < partitions:
            raise ValueError(f"partition {index} is not one of 0 to {partitions - 1}")
        return Keys(partition_namespace(self.namespace, index))

    def partitioned(self, partitions: int) -> list[Keys]:
        """The keys of every partition, in partition order."""
        return [self.partition(index, partitions) for index in range(max(1, partitions))]

    def with_partitions(self, partitions: int) -> list[Keys]:
        """This namespace's own keys, then each partition's (only the namespace's with one
        partition): every place a key family of the namespace can live."""
        return [self] if partitions <= 1 else [self, *self.partitioned(partitions)]

    @property
    def learned(self) -> str:
        """Sorted set case_id -> when a published checkpoint learned it (ms), with more than
        one partition only: the publish step's idempotency record, in the lineage's slot, so a
        case is published once although its lease lives in its partition's slot."""
        return self._key("ckpt", "learned")

    @property
    def trades(self) -> str:
        """Stream of trade-close events published by trading engines."""
        return self._key("trades")

    @property
    def trades_dead(self) -> str:
        """Stream of trade events that failed validation, with the reason."""
        return self._key("trades", "dead")

    @property
    def cases(self) -> str:
        """Set of the trainable case ids in Redis: the total that queued + leased + done +
        dead add up to. A case retired by retention leaves it (the archive keeps the case)."""
        return self._key("cases")

    @property
    def seen(self) -> str:
        """Sorted set trade key -> when first seen (ms): the idempotency record of every
        trade, win or loss, kept for the dedup window (NEGCASE_DEDUP_WINDOW_S)."""
        return self._key("trades", "seen")

    @property
    def retire(self) -> str:
        """Sorted set of finished case ids (done, dead, or without features) -> when they
        finished (ms): retention removes the oldest from Redis; the archive keeps them."""
        return self._key("cases", "retire")

    @property
    def featureless(self) -> str:
        """Set of loss case ids without features: archived and counted, never queued."""
        return self._key("cases", "featureless")

    @property
    def outcomes(self) -> str:
        """Capped stream of recent outcomes (wins, losses, skips) training replays."""
        return self._key("outcomes")

    @property
    def validation(self) -> str:
        """Capped stream of recent held-out outcomes: the window the gate judges on."""
        return self._key("outcomes", "validation")

    def case(self, case_id: str) -> str:
        """One negative case, msgpack."""
        return self._key("case", case_id)

    @property
    def queue(self) -> str:
        """Sorted set of cases waiting for training; a higher score is claimed first."""
        return self._key("queue")

    @property
    def leased(self) -> str:
        """Sorted set of claimed cases, scored by lease deadline (ms)."""
        return self._key("leased")

    @property
    def leases(self) -> str:
        """Hash case_id -> msgpack lease record (token, worker, attempts, queue score)."""
        return self._key("leases")

    @property
    def done(self) -> str:
        """Set of finished cases: trained (published or rejected by the gate), or held out."""
        return self._key("done")

    @property
    def dead(self) -> str:
        """Hash case_id -> last error, for cases past the attempt limit."""
        return self._key("dead")

    @property
    def rejected(self) -> str:
        """Hash case_id -> why the validation gate refused its update (a subset of done)."""
        return self._key("rejected")

    @property
    def attempts(self) -> str:
        """Hash case_id -> failed or expired attempts so far."""
        return self._key("attempts")

    @property
    def fencing(self) -> str:
        """Counter that hands out fencing tokens."""
        return self._key("fencing")

    def session(self, session_id: str) -> str:
        """One TrainingSession, msgpack."""
        return self._key("session", session_id)

    @property
    def sessions(self) -> str:
        """Sorted set of session ids by start time (ms); the newest NEGCASE_SESSIONS_KEPT."""
        return self._key("sessions")

    @property
    def open_sessions(self) -> str:
        """Sorted set of sessions still training -> deadline (ms), pushed on by the trainer's
        heartbeat: the reaper closes one whose trainer stopped beating (killed, cut off)."""
        return self._key("sessions", "open")

    def checkpoint(self, version: int) -> str:
        """One checkpoint: hash with safetensors bytes and metadata."""
        return self._key("ckpt", str(version))

    @property
    def latest(self) -> str:
        """The head of the lineage, an integer string: trainers build on it, and inference
        serves it once the serving step puts it in service (`serving`)."""
        return self._key("ckpt", "latest")

    @property
    def version_counter(self) -> str:
        """The highest checkpoint version ever handed out: versions come from INCR."""
        return self._key("ckpt", "counter")

    @property
    def publish_lock(self) -> str:
        """Lock that lets one trainer at a time rebase, archive and publish; a short TTL its
        holder renews, so it outlives a holder that died or was cut off by seconds only."""
        return self._key("ckpt", "lock")

    @property
    def checkpoints(self) -> str:
        """Stream of checkpoint announcements (published, rolled back)."""
        return self._key("checkpoints")

    @property
    def versions(self) -> str:
        """Sorted set of every published version (score = version) kept in Redis."""
        return self._key("ckpt", "versions")

    @property
    def serving(self) -> str:
        """Hash: which version is in service (answers signal requests), which is the canary
        (answers a share of them on trial), that share, and `epoch`, which every change
        moves on: the one state every inference worker follows (store/serving.py)."""
        return self._key("serving")

    @property
    def serving_history(self) -> str:
        """List of the versions in service before the current one, newest first: where an
        automatic rollback goes back to."""
        return self._key("serving", "history")

    @property
    def serving_refused(self) -> str:
        """Hash version -> why an inference worker refused it: never a canary or a rollback
        target again."""
        return self._key("serving", "refused")

    def live(self, version: int | str) -> str:
        """List of a version's most recent live outcomes, newest first: the P&L of each
        decision in percent of the margin, or `hold` for a decision not to trade."""
        return self._key("live", str(version))

    @property
    def live_versions(self) -> str:
        """Sorted set of the versions that have a live window (score = version)."""
        return self._key("live", "versions")

    @property
    def live_seen(self) -> str:
        """Sorted set trade_id -> when it was scored (ms): each trade enters a live window
        once, however often it is delivered or published."""
        return self._key("live", "seen")

    @property
    def requests(self) -> str:
        """Stream of signal requests for inference workers."""
        return self._key("signals", "requests")

    @property
    def requests_dead(self) -> str:
        """Stream of signal requests that could not be answered (no usable request_id)."""
        return self._key("signals", "dead")

    def reply(self, request_id: str) -> str:
        """List a requester waits on with BLPOP for its reply."""
        return self._key("signals", "reply", request_id)

    @property
    def events(self) -> str:
        """Capped stream with one entry per thing that happened."""
        return self._key("events")

    @property
    def stats(self) -> str:
        """Hash of counters."""
        return self._key("stats")

    def rate_bucket(self, bucket_s: int) -> str:
        """Hash of counters for one 10-second window, expiring, for rates."""
        return self._key("rate", str(bucket_s))

    def health(self, worker: str) -> str:
        """A worker's health record; it expires when the worker stops refreshing it."""
        return self._key("health", worker)

    @property
    def demo(self) -> str:
        """Marks a namespace `negcase demo` owns (JSON: host, pid, started_at_ms): a demo only
        runs in a namespace that is empty or holds this mark."""
        return self._key("demo")

    @property
    def workers(self) -> str:
        """Sorted set of worker ids by when their health key expires (ms): who to look up."""
        return self._key("workers")

    def representatives(self) -> list[str]:
        """One key of every kind this namespace builds (per-id keys with a sample id): what
        a check that the whole namespace lands in one Cluster slot hashes."""
        fixed = [
            getattr(self, name) for name, value in vars(Keys).items() if isinstance(value, property)
        ]
        sample = "x"
        per_id = [
            self.case(sample),
            self.session(sample),
            self.checkpoint(1),
            self.reply(sample),
            self.rate_bucket(0),
            self.health(sample),
            self.live(1),
        ]
        return fixed + per_id
