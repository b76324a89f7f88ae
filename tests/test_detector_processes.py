"""Detector processes killed, restarted and run side by side: nothing lost, nothing twice."""

from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest

from negcase.client.trades import publish_trades
from negcase.processes.losses import outcome_of
from negcase.schemas.case import case_id_for
from negcase.schemas.trade import TradeDefaults, TradeError, validate_trade
from negcase.sim.engine import random_trades
from negcase.store.archive import Archive
from negcase.store.keys import DETECTOR_GROUP
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Market:
    """What a detector must make of published trades: a case per loss, a count per win, a
    dead letter per malformed trade."""

    losses: set[str]
    wins: int
    malformed: int


def publish_market(client, settings, count: int, seed: int = 3) -> Market:
    """Publish `count` synthetic trades (some malformed); what each must become."""
    trades = random_trades(seed, prefix=f"s{seed}")
    batch = [next(trades) for _ in range(count)]
    publish_trades(client, settings.keys, batch)
    losses, wins, malformed = set(), 0, 0
    for trade in batch:
        try:
            valid = validate_trade(trade, TradeDefaults())
        except TradeError:
            malformed += 1
            continue
        if outcome_of(valid).is_loss:
            losses.add(case_id_for(valid.trade_id))
        else:
            wins += 1
    assert losses and wins and malformed  # each kind is there to be lost or doubled
    return Market(losses, wins, malformed)


def case_ids(client, settings) -> set[str]:
    return {member.decode() for member in client.smembers(settings.keys.cases)}


def stat(client, settings, name: str) -> int:
    return int(client.hget(settings.keys.stats, name) or 0)


def assert_nothing_lost_or_doubled(client, settings, market: Market) -> None:
    """Every trade ended as exactly one case, one win or one dead letter; none is pending."""
    assert case_ids(client, settings) == market.losses
    assert client.zcard(settings.keys.queue) == len(market.losses)
    assert stat(client, settings, "cases_added") == len(market.losses)
    assert stat(client, settings, "wins") == market.wins
    assert stat(client, settings, "trades") == len(market.losses) + market.wins
    assert stat(client, settings, "dead_lettered") == market.malformed
    assert client.xlen(settings.keys.trades_dead) == market.malformed
    assert stat(client, settings, "duplicates") == 0
    assert client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"] == 0
    assert set(Archive(settings.data_dir).read_index()) == market.losses


@pytest.mark.parametrize("restart_as", ["same-consumer", "other-consumer"])
def test_sigkill_mid_stream_then_restart_loses_nothing(client, settings, spawn, restart_as):
    # given a stream of trades and a detector working through it in small batches
    expected = publish_market(client, settings, 3000)
    first = spawn("detect", "--consumer", "d1", "--batch-size", "50", "--claim-idle-ms", "300")
    wait_until(lambda: client.scard(settings.keys.cases) > 100, what="the first cases")
    # when it is killed without warning, mid-stream
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert client.scard(settings.keys.cases) < len(expected.losses), "killed too late to test"
    # and a detector restarts (under the same name, or another that claims what d1 left)
    name = "d1" if restart_as == "same-consumer" else "d2"
    second = spawn("detect", "--consumer", name, "--burst", "--claim-idle-ms", "300")
    assert second.wait(120) == 0, second.stderr.read()
    # then every loss is a case exactly once, and nothing is left pending
    assert_nothing_lost_or_doubled(client, settings, expected)


def test_two_detectors_share_the_group(client, settings, spawn):
    expected = publish_market(client, settings, 4000, seed=5)
    detectors = [
        spawn("detect", "--consumer", f"d{i}", "--batch-size", "100", "--burst") for i in (1, 2)
    ]
    for process in detectors:
        assert process.wait(120) == 0, process.stderr.read()
    assert_nothing_lost_or_doubled(client, settings, expected)
    # and both left the group when they stopped: nothing was pending for them any more
    assert client.xinfo_consumers(settings.keys.trades, DETECTOR_GROUP) == []


def test_sigterm_finishes_the_batch_in_hand_and_exits_zero(client, settings, spawn):
    expected = publish_market(client, settings, 2000, seed=9)
    detector = spawn("detect", "--consumer", "d1", "--batch-size", "100")
    wait_until(lambda: client.scard(settings.keys.cases) > 0, what="the first cases")
    detector.send_signal(signal.SIGTERM)
    assert detector.wait(60) == 0, detector.stderr.read()
    # whatever it read it also stored and acknowledged: its pending list is empty
    assert client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"] == 0
    assert case_ids(client, settings) <= expected.losses
    # and a later detector finishes the stream
    rest = spawn("detect", "--consumer", "d2", "--burst")
    assert rest.wait(120) == 0
    assert_nothing_lost_or_doubled(client, settings, expected)
