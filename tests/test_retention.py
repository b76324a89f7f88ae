"""Bounded memory: finished cases leave Redis (the archive keeps them), the idempotency
record and the sessions are bounded, a late duplicate within the window still makes no
second case, and `negcase status` says what holds the memory."""

from __future__ import annotations

import torch

from negcase.cli.status import gather_status
from negcase.cli.status_view import render_status
from negcase.client.trades import publish_trades
from negcase.processes.detector import LossDetector
from negcase.processes.trainer import Trainer
from negcase.runtime.settings import Settings
from negcase.schemas.case import case_id_for
from negcase.sim.bench_soak import SoakPlan, run_soak, soak_settings
from negcase.store.archive import Archive
from negcase.store.queue import CaseQueue
from negcase.store.retention import Retention
from tests.conftest import run_burst, wait_until
from tests.training_cases import add_cases, assert_conserved, make_case, rule_cases

FEATURES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def loss(trade_id: str, features: list[float] | None = FEATURES) -> dict:
    return {
        "trade_id": trade_id,
        "symbol": "ETH/USDT",
        "side": "BUY",
        "entry_price": 3000,
        "exit_price": 2970,
        "features": features,
    }


def detect(client, settings: Settings) -> None:
    run_burst(LossDetector(client, settings, "d", Archive(settings.data_dir)))


def finish_all(client, settings: Settings) -> None:
    """Claim and ack every queued case, as trainers would."""
    queue = CaseQueue(client, settings.keys, lease_s=30.0)
    while leases := queue.claim("t", 10):
        queue.ack(leases)


def test_finished_cases_beyond_the_count_leave_redis_and_stay_archived(client, settings):
    settings = settings.with_overrides(case_retention_s=0.0, case_retention_count=5)
    # given 12 losses detected and trained, and 3 losses without features
    publish_trades(client, settings.keys, [loss(f"r{i}") for i in range(12)])
    publish_trades(client, settings.keys, [loss(f"f{i}", features=None) for i in range(3)])
    detect(client, settings)
    finish_all(client, settings)
    # when retention runs
    retired = Retention.of(client, settings).retire_cases()
    # then the 5 newest finished cases stay, the rest left Redis, the archive has them all
    keys = settings.keys
    assert retired == 10
    counts = assert_conserved(client, settings)
    assert counts["total"] + client.scard(keys.featureless) == 5
    assert client.zcard(keys.retire) == 5
    assert len(client.keys(keys.case("*"))) == 5
    assert len(list((settings.data_dir / "cases").glob("*.msgpack"))) == 15
    assert client.hget(keys.stats, "cases_retired") == b"10"
    assert client.hget(keys.stats, "cases_added") == b"15"  # counters keep the history


def test_finished_cases_leave_after_the_retention_time_and_queued_ones_stay(client, settings):
    settings = settings.with_overrides(case_retention_s=0.05, case_retention_count=0)
    add_cases(client, settings, [make_case(n, FEATURES) for n in range(4)])
    queue = CaseQueue(client, settings.keys, lease_s=30.0)
    queue.ack(queue.claim("t", 3))  # three finished, one still queued
    retention = Retention.of(client, settings)
    wait_until(lambda: retention.retire_cases() or not client.zcard(settings.keys.retire))
    counts = assert_conserved(client, settings)
    assert (counts["queued"], counts["done"], counts["total"]) == (1, 0, 1)


def test_a_late_duplicate_within_the_window_makes_no_second_case(client, settings):
    settings = settings.with_overrides(case_retention_s=0.001, case_retention_count=0)
    keys = settings.keys
    # given a loss detected, trained and retired from Redis
    publish_trades(client, keys, [loss("late")])
    detect(client, settings)
    finish_all(client, settings)
    retention = Retention.of(client, settings)
    wait_until(lambda: retention.retire_cases() or not client.zcard(keys.retire))
    assert not client.exists(keys.case(case_id_for("late")))
    # when the same trade arrives again, within the dedup window
    publish_trades(client, keys, [loss("late")])
    detect(client, settings)
    # then it is a duplicate, not a second case
    assert client.hget(keys.stats, "cases_added") == b"1"
    assert client.hget(keys.stats, "duplicates") == b"1"
    assert not client.exists(keys.case(case_id_for("late")))


def test_the_idempotency_record_keeps_at_most_its_cap(client, settings):
    settings = settings.with_overrides(dedup_max_ids=50, batch_size=30)
    wins = [{**loss(f"w{i}"), "exit_price": 3100} for i in range(200)]
    publish_trades(client, settings.keys, wins)
    detect(client, settings)
    assert client.zcard(settings.keys.seen) == 50
    # the newest are kept: a repeat of the last trade is still caught
    publish_trades(client, settings.keys, [wins[-1]])
    detect(client, settings)
    assert client.hget(settings.keys.stats, "duplicates") == b"1"
    assert client.hget(settings.keys.stats, "wins") == b"200"


def test_redis_keeps_the_newest_sessions_and_the_archive_all(client, settings):
    torch.set_num_threads(1)
    settings = settings.with_overrides(sessions_kept=3, heldout_share=0.0, min_outcomes=0)
    add_cases(client, settings, rule_cases(5, epochs=5))
    run_burst(Trainer(client, settings, "t", Archive(settings.data_dir)), timeout_s=120)
    keys = settings.keys
    assert client.zcard(keys.sessions) == 3
    assert len(client.keys(keys.session("*"))) == 3
    assert len(list((settings.data_dir / "sessions").glob("*.json"))) == 5


def test_status_shows_used_memory_and_what_holds_it(client, settings):
    publish_trades(client, settings.keys, [loss(f"m{i}") for i in range(20)])
    detect(client, settings)
    status = gather_status(client, settings.keys)
    memory = status["memory"]
    assert memory["used_memory_bytes"] > 0
    blobs = memory["families"]["case blobs"]
    assert blobs["keys"] == 20 and blobs["bytes"] > 20 * 100
    assert "sampled" in blobs["how"]
    assert memory["families"]["idempotency record"]["bytes"] > 0
    text = render_status(status)
    assert "memory  used" in text and "case blobs" in text


def test_a_small_soak_stays_within_its_retention_bounds(client, settings):
    soak = soak_settings(settings).with_overrides(
        trades_maxlen=1_000,
        events_maxlen=500,
        dedup_max_ids=600,
        case_retention_count=150,
        sessions_kept=5,
    )
    result = run_soak(client, soak, SoakPlan(trades=4_000, chunk=500, every=1_000))
    last = result["readings"][-1]
    assert last["trades"] == 4_000
    assert last["cases_in_redis"] <= 150
    assert last["seen_ids"] <= 600
    assert last["trades_stream"] <= 1_000 + 1_000  # trimmed a bounded step behind
    assert last["sessions"] <= 5
    assert result["bytes_per_case_blob"] > 0
