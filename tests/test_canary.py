"""Live safety with real processes: inference workers, a detector and engines trading on a
market with a hidden rule. A checkpoint trained on inverted labels and published during the
traffic is retired as a canary, or rolled back from service; a good one is promoted; two
workers split requests alike; and killing a worker or the detector mid-canary changes
nothing."""

from __future__ import annotations

import signal
from collections import defaultdict

import pytest
import redis

from negcase.cli.status import gather_status
from negcase.runtime.settings import Settings
from negcase.store.serving import read_state, takes_canary
from tests.conftest import wait_until, worker_env
from tests.live_trading import LiveTrading, model_rule, publish_trained
from tests.serving import events_of

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A small model, and a canary on a quarter of requests judged after 100 outcomes."""
    return settings.with_overrides(
        hidden_sizes=(16,),
        canary_share=0.25,
        canary_min_outcomes=100,
        live_window=200,
        block_ms=100,
        claim_idle_ms=1000,
    )


def outcomes(client: redis.Redis, settings: Settings, version: int) -> int:
    """Outcomes in a version's live window."""
    return client.llen(settings.keys.live(version))


def loaded(client: redis.Redis, settings: Settings, worker: str, version: int, role: str) -> bool:
    return any(
        (e.details["worker"], e.details["version"], e.details["role"])
        == (worker, str(version), role)
        for e in events_of(client, settings, "checkpoint_loaded")
    )


def decided(client: redis.Redis, settings: Settings, change: str, version: int) -> list:
    return [e for e in events_of(client, settings, change) if e.details["version"] == str(version)]


def test_a_bad_checkpoint_published_during_live_traffic_is_retired_and_a_good_one_promoted(
    client, settings, spawn
):
    # given a version of no skill in service, two inference workers, a detector, and two
    # engines trading on its signals
    service = publish_trained(client, settings, "coin_flips", seed=1)
    spawn("detect", "--consumer", "d1")
    spawn("serve", "--consumer", "w1")
    spawn("serve", "--consumer", "w2")
    minimum = settings.canary_min_outcomes
    with LiveTrading(settings) as trading:
        wait_until(lambda: outcomes(client, settings, service) >= minimum, 120, "live outcomes")
        # when a checkpoint trained on inverted labels is published during the traffic
        bad = publish_trained(client, settings, "inverted", seed=2)
        # then it starts as the canary and is retired on its live figures
        wait_until(lambda: decided(client, settings, "retired", bad), 120, "the retirement")
        # and when a good checkpoint follows, it is promoted to all traffic
        good = publish_trained(client, settings, "right", seed=3)
        wait_until(lambda: decided(client, settings, "promoted", good), 120, "the promotion")
    assert trading.failures == []
    started = [int(e.details["version"]) for e in events_of(client, settings, "canary_started")]
    assert started == [bad, good]
    # the retirement names the reason and the figures it rests on
    (retired,) = decided(client, settings, "retired", bad)
    figures = retired.details
    assert figures["reason"] == f"worse than v{service} in service"
    assert figures["baseline_version"] == str(service)
    assert minimum <= int(figures["n"]) <= settings.live_window
    assert float(figures["mean_pnl_pct"]) < 0 and float(figures["loss_rate"]) > 0.5
    assert float(figures["z"]) < float(figures["z_threshold"]) == -settings.canary_z
    # and so does the promotion
    (promoted,) = decided(client, settings, "promoted", good)
    assert float(promoted.details["mean_pnl_pct"]) > float(
        promoted.details["baseline_mean_pnl_pct"]
    )
    assert float(promoted.details["z"]) > -settings.canary_z
    state = read_state(client, settings.keys)
    assert (state.service, state.canary, state.history) == (good, None, (service,))
    # the bad version only ever answered its share of requests, each marked as a canary reply
    answered = trading.answered_by(bad)
    assert answered and all(r.canary for r in answered)
    assert all(takes_canary(r.request_id, bad, settings.canary_share) for r in answered)


def test_a_bad_version_put_in_service_at_once_is_rolled_back_within_the_window(
    client, settings, spawn
):
    # given no canary (each version serves at once), a good version in service with a full
    # window of live outcomes, and engines trading
    at_once = settings.with_overrides(canary_share=0.0)
    env = worker_env(at_once)
    good = publish_trained(client, settings, "right", seed=1)
    spawn("detect", "--consumer", "d1", env=env)
    spawn("serve", "--consumer", "w1", env=env)
    minimum = settings.canary_min_outcomes
    with LiveTrading(settings) as trading:
        wait_until(lambda: outcomes(client, settings, good) >= minimum, 120, "live outcomes")
        # when a checkpoint trained on inverted labels is published, it serves everything
        bad = publish_trained(client, settings, "inverted", seed=2)
        wait_until(lambda: decided(client, settings, "promoted", bad), 60, "the promotion")
        # then once it has its minimum of outcomes it is rolled back to the good version
        wait_until(lambda: decided(client, settings, "rollback", good), 120, "the rollback")
        wait_until(lambda: trading.answered_by(good)[-1:], 60, "the good version to answer")
    assert trading.failures == []
    (rollback,) = decided(client, settings, "rollback", good)
    figures = rollback.details
    assert figures["previous_version"] == str(bad)
    assert figures["reason"] == f"worse than v{good} before it"
    assert minimum <= int(figures["n"]) <= settings.live_window
    assert float(figures["z"]) < float(figures["z_threshold"]) == -settings.rollback_z
    state = read_state(client, settings.keys)
    assert (state.service, state.latest) == (good, good)


def test_a_version_worse_than_the_engines_own_rule_defers_to_it(client, settings, spawn):
    # given a version trained on inverted labels in service, a detector, an inference
    # worker, and engines whose own rule knows the market, reported on every trade
    bad = publish_trained(client, settings, "inverted", seed=2)
    env = worker_env(settings)
    spawn("detect", "--consumer", "d1", env=env)
    spawn("serve", "--consumer", "w1", env=env)
    with LiveTrading(settings, rule=model_rule(settings, seed=3)) as trading:
        # when it has answered the minimum of decisions, then it defers to the rule
        wait_until(lambda: decided(client, settings, "deferred", bad), 120, "the deferral")
        # and from then on its replies say "no opinion", so the engines keep their rule
        answered = len(trading.answered_by(bad))
        wait_until(lambda: len(trading.answered_by(bad)) >= answered + 40, 60, "more replies")
    assert trading.failures == []
    assert not any(reply.opinion for reply in trading.answered_by(bad)[-20:])
    assert any(reply.opinion for reply in trading.answered_by(bad)[:answered])
    (deferred,) = decided(client, settings, "deferred", bad)
    figures = deferred.details
    assert int(figures["n"]) >= settings.canary_min_outcomes
    assert float(figures["mean_pnl_pct"]) < float(figures["rule_mean_pnl_pct"])
    assert float(figures["z"]) < float(figures["z_threshold"]) == -settings.canary_z
    state = read_state(client, settings.keys)
    assert (state.service, state.service_defers) == (bad, True)


def test_two_workers_split_requests_alike_and_killing_one_mid_canary_changes_nothing(
    client, settings, spawn
):
    # given a version in service, two workers and a detector, and a canary both workers
    # have loaded, that must see 300 outcomes before it is judged
    trial = settings.with_overrides(canary_min_outcomes=300, live_window=300)
    env = worker_env(trial)
    service = publish_trained(client, settings, "coin_flips", seed=1)
    detector = spawn("detect", "--consumer", "d1", env=env)
    w1 = spawn("serve", "--consumer", "w1", env=env)
    spawn("serve", "--consumer", "w2", env=env)
    wait_until(lambda: read_state(client, settings.keys).epoch >= 1, 60, "a version in service")
    canary = publish_trained(client, settings, "right", seed=2)
    for worker in ("w1", "w2"):
        wait_until(lambda w=worker: loaded(client, settings, w, canary, "canary"), 60, worker)
    # (and an operator sees both serve it, in `negcase status`)
    wait_until(lambda: canaries_shown(client, settings) == {"w1": canary, "w2": canary}, 60)
    with LiveTrading(trial) as trading:
        wait_until(lambda: outcomes(client, settings, canary) >= 50, 120, "canary outcomes")
        # when a worker and the detector are killed mid-canary, and replacements start
        epoch = read_state(client, settings.keys).epoch
        for process in (w1, detector):
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert read_state(client, settings.keys).epoch == epoch
        spawn("detect", "--consumer", "d1", env=env)
        spawn("serve", "--consumer", "w3", env=env)
        # then the trial goes on to its one decision
        wait_until(lambda: decided(client, settings, "promoted", canary), 180, "the decision")
    wait_until(lambda: drained(client, settings), 60, "the detector to drain")
    assert trading.failures == []
    assert len(events_of(client, settings, "canary_started")) == 1
    assert [e.details["version"] for e in events_of(client, settings, "promoted")] == [
        str(service),
        str(canary),
    ]
    assert events_of(client, settings, "retired") == events_of(client, settings, "rollback") == []
    # and every worker split the requests by the same rule: the canary answered exactly the
    # requests the rule gives it while it was on trial, each worker some of both kinds
    kinds = defaultdict(set)
    for reply in trading.replies:
        on_trial = takes_canary(reply.request_id, canary, trial.canary_share)
        if reply.model_version == service:
            assert not on_trial and not reply.canary, reply
        elif reply.canary:
            assert reply.model_version == canary and on_trial, reply
        kinds[reply.worker].add(reply.canary)
    assert kinds["w1"] == kinds["w2"] == {True, False}
    # and each trade entered its version's live scores once, though the detector was killed
    stats = client.hgetall(settings.keys.stats)
    for version, reported in trading.reported.items():
        assert int(stats[f"model:{version}:scored".encode()]) == reported, version


def canaries_shown(client: redis.Redis, settings: Settings) -> dict[str, int | None]:
    workers = gather_status(client, settings.keys)["workers"]
    return {w["name"]: w["canary"] for w in workers if w["kind"] == "inference"}


def drained(client: redis.Redis, settings: Settings) -> bool:
    groups = client.xinfo_groups(settings.keys.trades)
    pending = client.xpending(settings.keys.trades, "detectors")["pending"]
    last = client.xrevrange(settings.keys.trades, count=1)
    return pending == 0 and bool(last) and groups[0]["last-delivered-id"] == last[0][0]
