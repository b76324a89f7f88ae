"""Training sessions in Redis (`<ns>:session:<id>`, `<ns>:sessions`) and in the archive's
sessions/ folder, each announced on `<ns>:events` when it starts and, once, when it ends.

A session is open (`<ns>:sessions:open`, scored by a deadline its trainer's heartbeat
pushes on) from its start to its end. Its trainer closes it; when the trainer stops beating
(killed, or cut off from Redis), any trainer's reaper closes it with the outcome
`abandoned`. Redis keeps the newest NEGCASE_SESSIONS_KEPT sessions; the archive keeps all.
"""

from __future__ import annotations

from itertools import chain

import msgpack
import redis

from negcase.schemas import event as events
from negcase.schemas.session import TrainingSession
from negcase.store.archive import Archive
from negcase.store.keys import Keys
from negcase.store.scripts import script

ABANDONED_ERROR = "its trainer stopped beating (killed, or cut off from Redis)"
# Most sessions one write drops from Redis, and most abandoned ones one reap closes.
DROP_STEP = 100
CLOSE_STEP = 100


class SessionStore:
    """Records each TrainingSession when it starts and when it ends."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        archive: Archive | None,
        events_maxlen: int = 100_000,
        kept: int = 10_000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.archive = archive
        self.events_maxlen = events_maxlen
        self.kept = max(1, kept)
        self._complete = script(client, "complete_session")

    def started(self, session: TrainingSession, now_ms: int, deadline_ms: int) -> None:
        """Store a session that begins, open until `deadline_ms` unless its trainer's
        heartbeat pushes that on, with a training_started event."""
        event = events.training_started(session, now_ms)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.session(session.session_id), session.to_msgpack())
        pipe.zadd(self.keys.sessions, {session.session_id: session.start_time_ms})
        pipe.zadd(self.keys.open_sessions, {session.session_id: deadline_ms})
        pipe.xadd(self.keys.events, event.to_fields(), maxlen=self.events_maxlen, approximate=True)
        pipe.execute()

    def completed(self, session: TrainingSession, now_ms: int) -> bool:
        """Store a finished session (Redis, then the archive); announce it and count its
        outcome unless a reaper closed it already. Returns whether this call closed it."""
        closed = self._close(session, now_ms, "own") == b"closed"
        self._archive(session)
        return closed

    def close_abandoned(self) -> int:
        """Close open sessions whose deadline passed (their trainer stopped beating) with
        the outcome `abandoned`. Returns how many were closed."""
        now_ms = _redis_now_ms(self.client)
        ids = self.client.zrangebyscore(self.keys.open_sessions, "-inf", now_ms, 0, CLOSE_STEP)
        closed = 0
        for raw_id in ids:
            session_id = raw_id.decode()
            session = self.get(session_id) or TrainingSession(
                session_id=session_id, trainer="?", start_time_ms=now_ms, case_ids=[],
                base_version=None, epochs_planned=0,
            )  # fmt: skip
            session.training_active = False
            session.outcome, session.error = "abandoned", ABANDONED_ERROR
            session.duration_s = round((now_ms - session.start_time_ms) / 1000, 3)
            if self._close(session, now_ms, "abandoned") == b"closed":
                self._archive(session)
                closed += 1
        return closed

    def get(self, session_id: str) -> TrainingSession | None:
        """One session from Redis, or None."""
        blob = self.client.get(self.keys.session(session_id))
        return None if blob is None else TrainingSession.from_msgpack(blob)

    def recent(self, count: int = 20) -> list[TrainingSession]:
        """The latest `count` sessions, newest first."""
        ids = self.client.zrevrange(self.keys.sessions, 0, count - 1)
        blobs = self.client.mget([self.keys.session(i.decode()) for i in ids]) if ids else []
        return [TrainingSession.from_msgpack(blob) for blob in blobs if blob is not None]

    def _close(self, session: TrainingSession, now_ms: int, mode: str) -> bytes:
        event = events.training_completed(session, now_ms).to_fields()
        drop = [i for i in self._beyond_kept() if i != session.session_id]
        return self._complete(
            keys=[
                self.keys.open_sessions,
                self.keys.session(session.session_id),
                self.keys.sessions,
                self.keys.events,
                self.keys.stats,
                *(self.keys.session(session_id) for session_id in drop),
            ],
            args=[
                session.session_id,
                session.to_msgpack(),
                msgpack.packb(list(chain.from_iterable(event.items()))),
                f"training_{session.outcome}",
                self.events_maxlen,
                mode,
                session.start_time_ms,
                *drop,
            ],
        )

    def _beyond_kept(self) -> list[str]:
        """The oldest sessions beyond the newest `kept`, a step at a time."""
        excess = int(self.client.zcard(self.keys.sessions)) - self.kept
        if excess <= 0:
            return []
        oldest = self.client.zrange(self.keys.sessions, 0, min(excess, DROP_STEP) - 1)
        return [session_id.decode() for session_id in oldest]

    def _archive(self, session: TrainingSession) -> None:
        if self.archive is not None:
            self.archive.write_json(
                self.archive.sessions_dir, f"{session.session_id}.json", session.to_dict()
            )


def _redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000
