"""Training sessions in Redis (`<ns>:session:<id>`, `<ns>:sessions`) and in the archive's
sessions/ folder, each announced on `<ns>:events`."""

from __future__ import annotations

import redis

from negcase.schemas import event as events
from negcase.schemas.event import Event
from negcase.schemas.session import TrainingSession
from negcase.store.archive import Archive
from negcase.store.keys import Keys


class SessionStore:
    """Records each TrainingSession when it starts and when it completes."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        archive: Archive | None,
        events_maxlen: int = 100_000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.archive = archive
        self.events_maxlen = events_maxlen

    def started(self, session: TrainingSession, now_ms: int) -> None:
        """Store a session that begins, with a training_started event."""
        self._write(session, events.training_started(session, now_ms), stat=None)

    def completed(self, session: TrainingSession, now_ms: int) -> None:
        """Store a finished session (Redis, then the archive) with a training_completed event."""
        self._write(session, events.training_completed(session, now_ms), stat=session.outcome)
        if self.archive is not None:
            self.archive.write_json(
                self.archive.sessions_dir, f"{session.session_id}.json", session.to_dict()
            )

    def get(self, session_id: str) -> TrainingSession | None:
        """One session from Redis, or None."""
        blob = self.client.get(self.keys.session(session_id))
        return None if blob is None else TrainingSession.from_msgpack(blob)

    def recent(self, count: int = 20) -> list[TrainingSession]:
        """The latest `count` sessions, newest first."""
        ids = self.client.zrevrange(self.keys.sessions, 0, count - 1)
        blobs = self.client.mget([self.keys.session(i.decode()) for i in ids]) if ids else []
        return [TrainingSession.from_msgpack(blob) for blob in blobs if blob is not None]

    def _write(self, session: TrainingSession, event: Event, stat: str | None) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.session(session.session_id), session.to_msgpack())
        pipe.zadd(self.keys.sessions, {session.session_id: session.start_time_ms})
        pipe.xadd(self.keys.events, event.to_fields(), maxlen=self.events_maxlen, approximate=True)
        if stat is not None:
            pipe.hincrby(self.keys.stats, f"training_{stat}", 1)
        pipe.execute()
