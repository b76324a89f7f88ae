"""Retention: what leaves Redis, and when, so that its memory levels off over months of
uptime. The archive keeps every case and session; Redis keeps what the workers still use.

- Finished cases (done, dead, or without features) leave Redis NEGCASE_CASE_RETENTION_S
  after they finished, or sooner when more than NEGCASE_CASE_RETENTION_COUNT are finished
  (retire.lua, run about once a second by detectors and trainers).
- The idempotency record `<ns>:trades:seen` keeps a trade key for NEGCASE_DEDUP_WINDOW_S,
  at most NEGCASE_DEDUP_MAX_IDS of them (trimmed by record_batch.lua as it adds).
- Sessions: the newest NEGCASE_SESSIONS_KEPT (store/sessions.py trims as it writes).
- Streams are capped by their MAXLEN settings; checkpoints by NEGCASE_KEEP_CHECKPOINTS.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from negcase.runtime.settings import Settings
from negcase.store.keys import Keys
from negcase.store.scripts import script

# Most cases one retire call judges: a bounded script, repeated while it finds work.
RETIRE_STEP = 1000
RETIRE_CALLS_MAX = 20


@dataclass(frozen=True, slots=True)
class CaseRetention:
    """How long finished cases stay in Redis (ms; 0: no bound) and how many at most (0: no
    bound)."""

    retention_ms: int
    keep: int


class Retention:
    """Retires finished cases past retention from Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, rule: CaseRetention) -> None:
        self.client = client
        self.keys = keys
        self.rule = rule
        self._retire = script(client, "retire")

    @classmethod
    def of(cls, client: redis.Redis, settings: Settings, keys: Keys | None = None) -> Retention:
        """The retention the settings describe, of the cases under `keys` (a partition's;
        by default the namespace's own)."""
        rule = CaseRetention(round(settings.case_retention_s * 1000), settings.case_retention_count)
        return cls(client, settings.keys if keys is None else keys, rule)

    def retire_cases(self) -> int:
        """Retire what is due, a bounded step at a time; returns how many cases left Redis."""
        retired = 0
        for _ in range(RETIRE_CALLS_MAX):
            candidates = self._candidates()
            if not candidates:
                break
            retired += self._retire_step(candidates)
            if len(candidates) < RETIRE_STEP:
                break
        return retired

    def _candidates(self) -> list[str]:
        """The oldest finished cases that may be due (retire.lua judges each again): one
        round trip when nothing is finished."""
        rule, retire = self.rule, self.keys.retire
        if not rule.retention_ms and not rule.keep:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(retire)
        pipe.zrange(retire, 0, 0, withscores=True)
        total, oldest = pipe.execute()
        if not oldest:
            return []
        # Not in the pipeline: a Cluster pipeline refuses TIME (a command with no key).
        seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        over = max(0, total - rule.keep) if rule.keep else 0
        old = bool(rule.retention_ms) and oldest[0][1] <= now_ms - rule.retention_ms
        if not old and not over:
            return []
        count = max(min(over, RETIRE_STEP), RETIRE_STEP if old else 0)
        return [member.decode() for member in self.client.zrange(retire, 0, count - 1)]

    def _retire_step(self, case_ids: list[str]) -> int:
        keys = self.keys
        return int(
            self._retire(
                keys=[
                    keys.retire,
                    keys.cases,
                    keys.featureless,
                    keys.done,
                    keys.dead,
                    keys.rejected,
                    keys.attempts,
                    keys.queue,
                    keys.leased,
                    keys.stats,
                    *(keys.case(case_id) for case_id in case_ids),
                ],
                args=[self.rule.retention_ms, self.rule.keep, *case_ids],
            )
        )
