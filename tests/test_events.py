"""The event catalogue (schemas/event.py) is what the producers write, Lua scripts included."""

from __future__ import annotations

from collections import defaultdict

from negcase.processes.reloader import Reloader
from negcase.processes.trainer import Trainer
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.event import CATALOGUE, EVENT_TYPES, Event
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.queue import CaseQueue
from tests.serving import serving_story, write_bad_checkpoint
from tests.test_monitor import detect, publish_checkpoint, small, trade
from tests.training_cases import claim_expired

# Written by Lua scripts, which cannot use the Python builders.
LUA_EMITTED = (
    "checkpoint_published",
    "rollback",
    "lease_expired",
    "case_dead",
    "canary_started",
    "promoted",
    "retired",
    "deferred",
)


def test_every_event_written_keeps_to_the_catalogue(client, settings) -> None:
    settings = small(settings)
    keys = settings.keys
    # given every producer at work: the detector, a trainer, the registry's publish and
    # rollback, a reloader, a failed case and an expired lease on its last attempt
    detect(
        client,
        settings,
        [
            trade("big", 2550, model_version=1),
            trade("mid", 2910),
            trade("small", 2985),
            {**trade("bad", 2970), "entry_price": 0},
        ],
    )
    trainer = Trainer(client, settings, "t1", None)
    trainer.train_claimed(trainer.queue.claim("t1"), StopFlag())
    second = publish_checkpoint(client, settings, 2, 0.6)
    CheckpointRegistry(client, keys).rollback(1)
    serving_story(client, settings)
    reloader = Reloader(client, settings, "w1")
    reloader.load(second)
    reloader.load(write_bad_checkpoint(client, settings, "wrong_sha256"))
    dying = CaseQueue(client, keys, lease_s=30, max_attempts=1)
    dying.fail(dying.claim("t2"), "CUDA out of memory", "t2")
    claim_expired(client, keys, "t3")
    dying.reap()

    # when the events are read back
    seen: dict[str, set[str]] = defaultdict(set)
    for _, fields in client.xrange(keys.events):
        event = Event.from_fields(fields)
        # then each is of a catalogued type and carries only catalogued fields
        assert event.type in CATALOGUE, event
        assert set(event.details) <= set(CATALOGUE[event.type].fields), event
        assert event.at_ms > 0
        seen[event.type] |= set(event.details)
    # and every type was written, and the Lua scripts write every field the catalogue lists
    assert set(seen) == set(EVENT_TYPES) == set(CATALOGUE)
    for name in LUA_EMITTED:
        assert seen[name] == set(CATALOGUE[name].fields), name
