"""What serves signal requests: the version in service, and a canary on trial.

`<ns>:serving` (hash) is the one state every inference worker follows:
  service           the version that answers signal requests
  canary            a newer version that answers `canary_share` of them on trial ('' none)
  canary_share      that share, fixed when the canary started, so every worker splits alike
  canary_min_outcomes   the outcomes it needs before it is judged
  epoch             moved on by every change; each announcement carries it
  service_since_ms, canary_since_ms   when each began
  watch, checked    whether the version in service is judged against its predecessor, and
                    its scored outcomes when it last was
  defers            the version in service when it defers to the engine's own rule: it was
                    worse than the rule on the same decisions, and answers with no opinion
  rule_checked      its decisions with a known rule when it was last compared with the rule
`<ns>:serving:history` lists the versions in service before, newest first, and
`<ns>:serving:refused` the versions an inference worker could not load.

Every change is made by serving_step.lua (or rollback_checkpoint.lua for an operator), in
one script: `ServingControl.step` reads the state, names the keys the step may touch, and
runs it; a step refused as stale (another process changed the state in between) is retried.
Before any step ran, the version `<ns>:ckpt:latest` names is in service.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from negcase.store.checkpoints import ANNOUNCEMENTS_MAXLEN, version_of
from negcase.store.keys import Keys
from negcase.store.scripts import script

if TYPE_CHECKING:  # store/ reads settings it is given, it does not build them
    from negcase.runtime.settings import Settings

log = logging.getLogger(__name__)

MAX_STEP_TRIES = 10
# Live windows kept beyond those the step needs (service, canary, latest, history): the
# newest this many versions, for people to compare.
WINDOWS_KEPT = 20
_HASH_RANGE = 2**32


def takes_canary(request_id: str, canary_version: int, share: float) -> bool:
    """Whether the canary answers this request: a fixed hash of the canary's version and the
    request id, below the share. Every worker computes the same, with no shared state; a
    new canary draws a different share of requests."""
    digest = zlib.crc32(f"{canary_version}:{request_id}".encode())
    return digest < share * _HASH_RANGE


def answering_version(state: ServingState, request_id: str) -> int | None:
    """The version that answers a request under `state`: the canary for its share of
    requests, the version in service for the rest (None before any checkpoint)."""
    canary = state.canary
    if canary is not None and takes_canary(request_id, canary, state.canary_share):
        return canary
    return state.service


@dataclass(frozen=True, slots=True)
class ServingState:
    """The serving state as read from Redis."""

    service: int | None
    canary: int | None = None
    canary_share: float = 0.0
    epoch: int = 0
    history: tuple[int, ...] = ()
    latest: int | None = None
    # The version in service defers to the engine's own rule (serving_step.lua): every
    # reply it gives says "no opinion".
    service_defers: bool = False


@dataclass(frozen=True, slots=True)
class ServingChange:
    """A change one step made: canary_started, promoted, retired, rollback or deferred."""

    kind: str
    version: int
    reason: str


def read_state(client: redis.Redis, keys: Keys) -> ServingState:
    """The serving state in one round trip; before any step ran, latest is in service."""
    pipe = client.pipeline(transaction=True)
    pipe.hmget(keys.serving, ["service", "canary", "canary_share", "epoch", "defers"])
    pipe.lrange(keys.serving_history, 0, -1)
    pipe.get(keys.latest)
    (service, canary, share, epoch, defers), history, latest = pipe.execute()
    latest_version = version_of(latest)
    in_service = version_of(service) if service is not None else latest_version
    return ServingState(
        service=in_service,
        canary=version_of(canary),
        canary_share=float(share or 0),
        epoch=int(epoch or 0),
        history=tuple(int(v) for v in history),
        latest=latest_version,
        service_defers=in_service is not None and version_of(defers) == in_service,
    )


class ServingControl:
    """Runs the serving step with one process's settings (share, thresholds, on or off)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.keys = settings.keys
        self.settings = settings
        self.acks = settings.replica_acks
        self._step = script(client, "serving_step", "clock", "live_stats")

    def step(self, refused: int | None = None, reason: str = "") -> ServingChange | None:
        """Make the change the live results call for, if any (see serving_step.lua); with
        `refused`, first mark that version as one a worker could not load. Returns the
        change, or None."""
        for _ in range(MAX_STEP_TRIES):
            reply = self._try(refused, reason)
            if reply[0] == b"stale":
                continue
            if reply[0] == b"unchanged":
                return None
            change = ServingChange(reply[0].decode(), int(reply[1]), reply[2].decode())
            why = f": {change.reason}" if change.reason else ""
            log.info(f"serving: {change.kind} v{change.version}{why}")
            return change
        # Others keep changing the state: their steps decided; the next call looks again.
        log.warning(f"serving step refused as stale {MAX_STEP_TRIES} times in a row")
        return None

    def _try(self, refused: int | None, reason: str) -> list[bytes]:
        keys, settings = self.keys, self.settings
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(keys.serving)
        pipe.lrange(keys.serving_history, 0, -1)
        pipe.get(keys.latest)
        pipe.zrevrange(keys.live_versions, 0, -1)
        state, history, latest, windows = pipe.execute()
        service, canary = state.get(b"service", b""), state.get(b"canary", b"")
        involved = list(dict.fromkeys(v for v in (service, canary, latest or b"", *history) if v))
        kept = {int(v) for v in windows[:WINDOWS_KEPT]} | {int(v) for v in involved}
        dropped = [int(v) for v in windows if int(v) not in kept]
        # A change must outlive its primary as a publish must: replicas confirm it first.
        return self.acks.run_script(
            self.client,
            self._step,
            keys=[
                keys.serving,
                keys.serving_history,
                keys.serving_refused,
                keys.latest,
                keys.checkpoints,
                keys.events,
                keys.stats,
                keys.live_versions,
                *(key for v in involved for key in (keys.live(v.decode()), _ckpt(keys, v))),
                *(keys.live(v) for v in dropped),
            ],
            args=[
                state.get(b"epoch", b"0"),
                latest or b"",
                settings.canary_share,
                int(settings.auto_rollback),
                settings.canary_min_outcomes,
                settings.canary_z,
                settings.rollback_z,
                ANNOUNCEMENTS_MAXLEN,
                settings.events_maxlen,
                "" if refused is None else refused,
                reason,
                len(involved),
                *involved,
                *dropped,
            ],
        )


def _ckpt(keys: Keys, version: bytes) -> str:
    return keys.checkpoint(int(version))
