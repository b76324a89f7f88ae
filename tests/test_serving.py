"""Live scores and the serving step on a real Redis: each trade scored once, a canary promoted
or retired on its figures, a worse version in service rolled back to one that still loads,
and steps racing from many clients making each change once."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import redis
import safetensors.numpy

from negcase.cli.status import gather_status
from negcase.cli.status_view import render_status
from negcase.processes.trainer import Trainer
from negcase.runtime.settings import Settings
from negcase.schemas.event import Event
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import connect
from negcase.store.live import LiveOutcome, LiveScores, window_stats, z_score
from negcase.store.serving import ServingControl, read_state, takes_canary
from negcase.store.sessions import SessionStore
from tests.conftest import run_burst
from tests.serving import events_of, publish, serving_story
from tests.training_cases import add_cases, make_case, random_features

# Two P&L patterns with the same spread: a version that earns, one that loses.
GOOD = [1.5, -0.5, 2.0, 0.5, -1.0, 1.0, 2.5, 0.0]
BAD = [-1.5, 0.5, -2.0, -0.5, 1.0, -1.0, -2.5, 0.0]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A small canary: a quarter of requests, judged after 16 outcomes, windows of 32."""
    return settings.with_overrides(canary_share=0.25, canary_min_outcomes=16, live_window=32)


def score(client: redis.Redis, settings: Settings, version: int, pnls: list, tag: str) -> None:
    """Outcomes of `version` with these P&Ls, under fresh trade ids."""
    live = LiveScores(client, settings.keys, settings.live_window)
    live.record([LiveOutcome(f"{tag}-{i}", version, pnl) for i, pnl in enumerate(pnls)])


def control(client: redis.Redis, settings: Settings) -> ServingControl:
    return ServingControl(client, settings)


def test_each_trade_is_scored_once_however_often_it_arrives(client, settings) -> None:
    live = LiveScores(client, settings.keys, window=4)
    # given outcomes of two versions, one of them repeated inside the batch
    outcomes = [LiveOutcome(f"t{i}", 1 + i % 2, float(i)) for i in range(6)]
    assert live.record([*outcomes, outcomes[0]]) == (6, 1)
    # when the same batch is delivered again (a crash before it was acknowledged)
    assert live.record(outcomes) == (0, 6)
    # then each trade is in its version's window once, newest first, and counted once
    keys = settings.keys
    assert client.lrange(keys.live(1), 0, -1) == [b"4.0", b"2.0", b"0.0"]
    assert client.hget(keys.stats, "model:1:scored") == b"3"
    assert client.hget(keys.stats, "live_duplicates") == b"7"
    # and a window keeps only the most recent outcomes
    live.record([LiveOutcome(f"u{i}", 1, -1.0) for i in range(3)])
    assert client.lrange(keys.live(1), 0, -1) == [b"-1.0", b"-1.0", b"-1.0", b"4.0"]
    assert live.versions() == [2, 1]


def test_a_window_counts_holds_as_decisions_that_made_nothing(client, settings) -> None:
    stats = window_stats([b"2.0", b"hold", b"-1.0", b"hold", b"written by hand"])
    assert (stats.n, stats.trades, stats.losses) == (4, 2, 1)
    assert stats.mean_pnl_pct == pytest.approx(0.25)
    assert stats.loss_rate == 0.5


def test_the_first_version_serves_at_once_and_a_newer_one_starts_as_a_canary(
    client, settings
) -> None:
    # given a first published version
    first = publish(client, settings, seed=1)
    # when the step runs, then it serves at once: there is nothing to compare it with
    decision = control(client, settings).step()
    assert (decision.kind, decision.version) == ("promoted", first)
    assert read_state(client, settings.keys).service == first
    # and when a newer one is published, it starts as the canary for a quarter of requests
    second = publish(client, settings, seed=2)
    decision = control(client, settings).step()
    assert (decision.kind, decision.version) == ("canary_started", second)
    state = read_state(client, settings.keys)
    assert (state.service, state.canary, state.canary_share) == (first, second, 0.25)
    (started,) = events_of(client, settings, "canary_started")
    assert started.details == {
        "version": str(second),
        "service_version": str(first),
        "share": "0.25",
        "min_outcomes": "16",
    }
    # and each step is announced for the workers, with the epoch it made
    kinds = [f[b"kind"] for _, f in client.xrange(settings.keys.checkpoints)]
    assert kinds == [b"published", b"promoted", b"published", b"canary_started"]
    assert state.epoch == 2


def canary_on_trial(client: redis.Redis, settings: Settings) -> tuple[int, int]:
    service = publish(client, settings, seed=1)
    control(client, settings).step()
    canary = publish(client, settings, seed=2)
    control(client, settings).step()
    return service, canary


def test_a_canary_no_worse_than_the_version_in_service_is_promoted_with_its_figures(
    client, settings
) -> None:
    service, canary = canary_on_trial(client, settings)
    score(client, settings, service, GOOD * 4, "s")
    # given a canary one outcome short of being judged, nothing changes
    score(client, settings, canary, (GOOD * 2)[:15], "c")
    assert control(client, settings).step() is None
    # when it reaches the minimum, doing as well as the version in service
    score(client, settings, canary, [1.5], "c-last")
    decision = control(client, settings).step()
    # then it is promoted, and the event carries the figures it was judged on
    assert (decision.kind, decision.version) == ("promoted", canary)
    state = read_state(client, settings.keys)
    assert (state.service, state.canary, state.history) == (canary, None, (service,))
    (promoted,) = [e for e in events_of(client, settings, "promoted") if e.details.get("z")]
    canary_stats = LiveScores(client, settings.keys, 32).stats([canary])[canary]
    service_stats = LiveScores(client, settings.keys, 32).stats([service])[service]
    details = promoted.details
    assert details["previous_version"] == str(service)
    assert int(details["n"]) == canary_stats.n == 16
    assert int(details["baseline_n"]) == service_stats.n == 32
    assert float(details["mean_pnl_pct"]) == pytest.approx(canary_stats.mean_pnl_pct, abs=1e-5)
    assert float(details["z"]) == pytest.approx(z_score(canary_stats, service_stats), abs=1e-4)
    assert float(details["z_threshold"]) == -settings.canary_z
    assert "not worse than" in details["reason"]


def test_a_worse_canary_is_retired_and_trainers_build_on_the_version_in_service(
    client, settings
) -> None:
    service, canary = canary_on_trial(client, settings)
    score(client, settings, service, GOOD * 2, "s")
    # when the canary loses where the version in service earns (beside a value someone
    # pushed by hand, which no figure counts)
    score(client, settings, canary, BAD * 2, "c")
    client.lpush(settings.keys.live(canary), "by hand")
    decision = control(client, settings).step()
    # then it is retired with its figures, and latest points back at the version in service
    assert (decision.kind, decision.version) == ("retired", canary)
    state = read_state(client, settings.keys)
    assert (state.service, state.canary, state.latest) == (service, None, service)
    (retired,) = events_of(client, settings, "retired")
    assert retired.details["n"] == "16"
    assert float(retired.details["z"]) < -settings.canary_z
    assert float(retired.details["mean_pnl_pct"]) < float(retired.details["baseline_mean_pnl_pct"])
    # and the next version, built on the one in service, is the next canary
    following = publish(client, settings, seed=3)
    assert control(client, settings).step().kind == "canary_started"
    assert read_state(client, settings.keys).canary == following


def test_a_trainer_builds_on_what_the_live_logic_decided_before_it_trains(client, settings) -> None:
    # given a canary whose live results call for its retirement, before any process took
    # that step (latest still names the canary)
    service, canary = canary_on_trial(client, settings)
    score(client, settings, service, GOOD * 2, "s")
    score(client, settings, canary, BAD * 2, "c")
    assert read_state(client, settings.keys).latest == canary
    # when a trainer trains the next case
    quick = settings.with_overrides(min_outcomes=0, epoch_multiplier=0.01)
    add_cases(client, quick, [make_case(1, random_features(random.Random(1)), priority=1)])
    run_burst(Trainer(client, quick, "t1", None), timeout_s=120)
    # then it built on the version in service: the retirement was settled first
    (session,) = SessionStore(client, settings.keys, None).recent()
    assert session.base_version == service
    assert read_state(client, settings.keys).canary != canary


def served_directly(client: redis.Redis, settings: Settings, seeds: range) -> list[int]:
    """Versions published and put in service one after the other (no canary)."""
    no_canary = settings.with_overrides(canary_share=0.0)
    versions = []
    for seed in seeds:
        versions.append(publish(client, settings, seed=seed))
        control(client, no_canary).step()
    return versions


def test_a_version_in_service_worse_than_its_predecessor_is_rolled_back(client, settings) -> None:
    first, second = served_directly(client, settings, range(1, 3))
    score(client, settings, first, GOOD * 4, "v1")
    # when the version in service does worse than its predecessor did, over min outcomes
    score(client, settings, second, BAD * 2, "v2")
    decision = control(client, settings).step()
    # then it is rolled back: the predecessor serves again, and trainers build on it
    assert (decision.kind, decision.version) == ("rollback", first)
    state = read_state(client, settings.keys)
    assert (state.service, state.latest, state.history) == (first, first, ())
    (rollback,) = events_of(client, settings, "rollback")
    assert rollback.details["previous_version"] == str(second)
    assert float(rollback.details["z"]) < -settings.rollback_z
    assert float(rollback.details["z_threshold"]) == -settings.rollback_z
    # and the version restored is not judged again against an older one
    score(client, settings, first, BAD * 4, "v1-later")
    assert control(client, settings).step() is None


def test_a_version_in_service_is_judged_once_per_min_outcomes(client, settings) -> None:
    first, second = served_directly(client, settings, range(1, 3))
    score(client, settings, first, GOOD * 4, "v1")
    # given a version in service judged not worse at its first 16 outcomes
    score(client, settings, second, GOOD * 2, "v2")
    assert control(client, settings).step() is None
    # when it then loses, it is judged again only once it has 16 more outcomes
    score(client, settings, second, (BAD * 2)[:15], "v2-b")
    assert control(client, settings).step() is None
    score(client, settings, second, [-2.5], "v2-c")
    assert control(client, settings).step().kind == "rollback"


def test_a_rollback_goes_back_only_to_a_version_that_still_loads(client, settings) -> None:
    first, second, third, fourth = served_directly(client, settings, range(1, 5))
    for version in (first, second, third):
        score(client, settings, version, GOOD * 4, f"v{version}")
    # given the predecessor trimmed from Redis and the one before it refused by a worker
    client.delete(settings.keys.checkpoint(third))
    control(client, settings).step(refused=second, reason="sha256 does not match")
    # when the version in service does worse
    score(client, settings, fourth, BAD * 2, "v4")
    decision = control(client, settings).step()
    # then it goes back past both, to the newest version that can still be loaded
    assert (decision.kind, decision.version) == ("rollback", first)
    # and with nothing loadable left to go back to, nothing moves
    (fifth,) = served_directly(client, settings, range(5, 6))
    client.delete(settings.keys.checkpoint(first))
    score(client, settings, fifth, BAD * 2, "v5")
    assert control(client, settings).step() is None
    assert read_state(client, settings.keys).service == fifth


def test_a_refused_canary_is_retired_and_a_refused_version_in_service_rolled_back(
    client, settings
) -> None:
    service, canary = canary_on_trial(client, settings)
    decision = control(client, settings).step(refused=canary, reason="holds NaN")
    assert (decision.kind, decision.reason) == (
        "retired",
        "refused by an inference worker: holds NaN",
    )
    (third,) = served_directly(client, settings, range(3, 4))
    decision = control(client, settings).step(refused=third, reason="not safetensors")
    assert (decision.kind, decision.version) == ("rollback", service)
    # and a refused version never starts as a canary
    assert control(client, settings).step() is None


def test_live_decisions_off_serve_every_version_at_once(client, settings) -> None:
    off = settings.with_overrides(auto_rollback=False)
    first = publish(client, settings, seed=1)
    control(client, off).step()
    second = publish(client, settings, seed=2)
    decision = control(client, off).step()
    assert (decision.kind, decision.version) == ("promoted", second)
    assert "NEGCASE_AUTO_ROLLBACK=0" in decision.reason
    # and however badly it does, nothing is rolled back
    score(client, settings, first, GOOD * 4, "v1")
    score(client, settings, second, BAD * 4, "v2")
    assert control(client, off).step() is None


def test_steps_racing_from_many_clients_make_each_change_once(client, settings, redis_url):
    # given a version in service, a canary that has earned promotion, and a newer version
    service, canary = canary_on_trial(client, settings)
    score(client, settings, service, GOOD * 4, "s")
    score(client, settings, canary, GOOD * 2, "c")
    publish(client, settings, seed=3)
    # when eight clients step at once, many times each
    decisions: list[str] = []
    start = threading.Barrier(8)

    def stepper() -> None:
        own = connect(redis_url)
        steps = ServingControl(own, settings)
        start.wait()
        for _ in range(10):
            if decision := steps.step():
                decisions.append(decision.kind)
        own.close()

    threads = [threading.Thread(target=stepper) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # then the canary was promoted once, and the newer version started once after it
    assert sorted(decisions) == ["canary_started", "promoted"]
    changes = [Event.from_fields(f).type for _, f in client.xrange(settings.keys.events)]
    assert changes.count("promoted") == 2 and changes.count("canary_started") == 2


def test_publishing_never_trims_a_version_serving_needs(client, settings) -> None:
    # given v1 in service, v2 in the history, and a canary on trial
    registry = CheckpointRegistry(client, settings.keys, keep=2)
    first, second = served_directly(client, settings, range(1, 3))
    canary = publish(client, settings, seed=3)
    control(client, settings).step()
    assert read_state(client, settings.keys).canary == canary
    # when many more versions are published while only the newest two are kept
    for seed in range(4, 9):
        publish(client, settings, seed=seed)
    weights = safetensors.numpy.save({"w": np.zeros(2, np.float32)})  # never loaded here
    registry.publish(weights, "0" * 64, {}, registry.latest_version())
    # then the version in service, the history and the canary are still stored, while the
    # versions nobody needs are trimmed
    for version in (first, second, canary):
        assert registry.fetch(version) is not None, version
    assert registry.fetch(canary + 1) is None


def test_an_operator_rollback_serves_that_version_and_ends_the_canary(client, settings):
    service, _ = canary_on_trial(client, settings)
    CheckpointRegistry(client, settings.keys).rollback(service)
    state = read_state(client, settings.keys)
    assert (state.service, state.canary, state.latest) == (service, None, service)
    (rollback,) = events_of(client, settings, "rollback")
    assert rollback.details["reason"] == "operator"


def test_the_canary_takes_a_fixed_share_of_request_ids() -> None:
    ids = [f"engine-{n}" for n in range(20_000)]
    chosen = [request_id for request_id in ids if takes_canary(request_id, 7, 0.1)]
    assert 0.09 < len(chosen) / len(ids) < 0.11
    # the same ids every time, and another canary draws others
    assert chosen == [request_id for request_id in ids if takes_canary(request_id, 7, 0.1)]
    assert chosen != [request_id for request_id in ids if takes_canary(request_id, 8, 0.1)]
    assert not any(takes_canary(request_id, 7, 0.0) for request_id in ids)


def test_status_shows_what_serves_and_each_versions_live_figures(client, settings) -> None:
    # given a version in service with outcomes, and a canary part-way through its trial
    service, canary = canary_on_trial(client, settings)
    score(client, settings, service, GOOD * 4, "s")
    score(client, settings, canary, [None, *GOOD[:4]], "c")  # None: a decision to hold
    # when an operator asks
    status = gather_status(client, settings.keys)
    # then the JSON names both, with the canary's progress and each version's figures
    live = status["live"]
    figures = LiveScores(client, settings.keys, 32).stats([canary, service]).values()
    assert live["service"] == service and live["epoch"] == 2
    assert live["canary"] == {
        "version": canary,
        "share": 0.25,
        "since_ms": live["canary"]["since_ms"],
        "min_outcomes": 16,
        "outcomes": 5,
        "z": pytest.approx(z_score(*figures), abs=1e-3),
    }
    assert live["versions"][str(canary)] == {
        "role": "canary",
        "outcomes": 5,
        "trades": 4,
        "losses": 1,
        "loss_rate": 0.25,
        "mean_pnl_pct": 0.7,
        "stdev_pct": pytest.approx(1.0368, abs=1e-4),
    }
    assert live["versions"][str(service)]["role"] == "service"
    # and the text says the same in words
    text = render_status(status)
    assert f"serving  v{service} in service since " in text
    assert f"\n  canary v{canary} on 25% of requests: 5 of 16 outcomes, z " in text
    table = text[text.index("live figures") :].splitlines()
    row = next(line for line in table if line.startswith(f"  v{canary} "))
    assert row.split() == [f"v{canary}", "canary", "5", "4", "1", "25.0%", "+0.700%"]


def test_a_version_an_operator_put_in_service_is_not_deferred_again(client, settings):
    # given the serving story: its version in service ends deferred to the engine's rule
    service, _, _ = serving_story(client, settings)
    judged = settings.with_overrides(canary_min_outcomes=2, live_window=4)
    assert read_state(client, settings.keys).service_defers
    # when an operator puts that same version back in service, then no step defers it again,
    # however many decisions worse than the rule it makes: a person chose it
    CheckpointRegistry(client, settings.keys).rollback(service)
    live = LiveScores(client, settings.keys, judged.live_window)
    live.record([LiveOutcome(f"op-{n}", service, -1.0, 1.0) for n in range(4)])
    assert ServingControl(client, judged).step() is None
    assert not read_state(client, settings.keys).service_defers
