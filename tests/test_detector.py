"""The loss detector against a real Redis: cases, queue order, dead letters, the archive."""

from __future__ import annotations

import dataclasses

import msgpack
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from negcase.client.trades import encode_trade, publish_trades
from negcase.processes.detector import LossDetector
from negcase.runtime.settings import Settings
from negcase.schemas.case import NegativeCase, case_id_for
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.keys import DETECTOR_GROUP
from negcase.store.queue import queue_score
from negcase.store.streams import entries_of
from tests.conftest import run_burst

FEATURES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def losing(trade_id: str, exit_price: float = 2970, **extra) -> dict:
    return {
        "trade_id": trade_id,
        "symbol": "ETH/USDT",
        "side": "BUY",
        "entry_price": 3000,
        "exit_price": exit_price,
        "features": FEATURES,
        **extra,
    }


def drain(client: redis.Redis, settings: Settings, archive: bool = True) -> LossDetector:
    detector = LossDetector(
        client, settings, "test-detector", Archive(settings.data_dir) if archive else None
    )
    run_burst(detector)
    return detector


def test_a_loss_becomes_one_queued_archived_case(client, settings):
    # given the README's example trade, published with plain XADD fields
    client.xadd(settings.keys.trades, encode_trade(losing("t1"), "flat"))
    # when a detector drains the stream
    drain(client, settings)
    # then one priority-1 case is queued, stored, archived, announced and acknowledged
    case_id = case_id_for("t1")
    queued = client.zrange(settings.keys.queue, 0, -1, withscores=True)
    assert [member for member, _ in queued] == [case_id.encode()]
    stored = CaseStore(client, settings.keys).get(case_id)
    assert stored is not None and stored.training_priority == 1
    assert stored.what_should_have_been_done == "SELL" and stored.loss_percentage == 1.0
    assert Archive(settings.data_dir).read_case(case_id) == stored
    event = client.xrange(settings.keys.events)[0][1]
    assert event[b"type"] == b"case_added" and event[b"case_id"] == case_id.encode()
    assert client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"] == 0


def test_queue_orders_by_priority_then_loss_then_age():
    by_priority = queue_score(2, 1.5, 1_000_000)
    bigger_loss = queue_score(1, 0.9, 1_000_000)
    older = queue_score(1, 0.5, 1_000_000)
    newer = queue_score(1, 0.5, 1_002_000)
    assert by_priority > bigger_loss > older > newer


def test_duplicates_and_redeliveries_make_no_second_case(client, settings):
    # given the same trade twice, once flat and once as json
    publish_trades(client, settings.keys, [losing("dup")], "flat")
    publish_trades(client, settings.keys, [losing("dup")], "json")
    # when drained
    drain(client, settings)
    # then one case, one duplicate counted
    assert client.scard(settings.keys.cases) == 1
    assert client.hget(settings.keys.stats, "duplicates") == b"1"
    assert client.hget(settings.keys.stats, "cases_added") == b"1"


def test_bad_entries_are_dead_lettered_with_reason_and_original_fields(client, settings):
    client.xadd(
        settings.keys.trades,
        {"trade_id": "bad1", "symbol": "X", "side": "BUY", "entry_price": "-3", "exit_price": "1"},
    )
    client.xadd(settings.keys.trades, {"avro": b"\x00\x01"})
    drain(client, settings)
    dead = client.xrange(settings.keys.trades_dead)
    assert len(dead) == 2
    first, second = dead[0][1], dead[1][1]
    assert first[b"dead:reason"] == b"entry_price: must be > 0, got -3"
    assert first[b"trade_id"] == b"bad1" and first[b"entry_price"] == b"-3"
    assert second[b"dead:field"] == b"entry" and second[b"avro"] == b"\x00\x01"
    assert client.hget(settings.keys.stats, "dead_lettered") == b"2"
    types = [fields[b"type"] for _, fields in client.xrange(settings.keys.events)]
    assert types == [b"dead_lettered", b"dead_lettered"]
    assert client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"] == 0


def test_wins_count_per_model_version_and_featureless_losses_are_kept_not_queued(client, settings):
    publish_trades(
        client,
        settings.keys,
        [
            losing("w1", exit_price=3100, model_version=1),
            losing("l1", model_version=1),
            {**losing("l2", model_version=2), "features": None},
        ],
    )
    drain(client, settings)
    stats = {k.decode(): v.decode() for k, v in client.hgetall(settings.keys.stats).items()}
    assert stats["model:1:trades"] == "2" and stats["model:1:losses"] == "1"
    assert stats["model:2:trades"] == "1" and stats["wins"] == "1"
    assert stats["cases_without_features"] == "1"
    assert client.zcard(settings.keys.queue) == 1
    assert client.sismember(settings.keys.featureless, case_id_for("l2"))
    assert Archive(settings.data_dir).read_case(case_id_for("l2")).features is None


def test_each_versions_decisions_add_up_against_the_engines_rule(client, settings):
    # given v1's trades on a market that rose 1 % (BUY made +1 %, SELL -1 %): one BUY where
    # the rule sold, one SELL where the rule held, one BUY as the rule did, one BUY whose
    # engine did not say, and the BUY where the rule sold again, delivered twice
    trades = [
        losing("a", 3030, model_version=1, rule_side="SELL"),
        losing("b", 3030, model_version=1, rule_side="HOLD", side="SELL"),
        losing("c", 3030, model_version=1, rule_side="BUY"),
        losing("d", 3030, model_version=1),
    ]
    publish_trades(client, settings.keys, [*trades, trades[0]])
    # when the detector scores them
    drain(client, settings)
    # then v1's sums hold its P&L minus the rule's on each decision with a known rule, once
    sums = client.hmget(
        settings.keys.stats,
        ["model:1:rule_n", "model:1:rule_sum", "model:1:rule_sum_d", "model:1:rule_sumsq_d"],
    )
    # (differences: +2, -1 and 0; the rule made -1, 0 and +1)
    assert [float(v) for v in sums] == pytest.approx([3, 0, 1, 5])


def test_archive_matches_redis(client, settings):
    trades = [losing(f"a{i}", exit_price=3000 - 10 * (i + 1)) for i in range(40)]
    publish_trades(client, settings.keys, trades, "msgpack")
    drain(client, settings)
    archive = Archive(settings.data_dir)
    in_redis = {m.decode() for m in client.smembers(settings.keys.cases)}
    assert set(archive.read_index()) == in_redis
    assert {case.case_id for case in archive.iter_cases()} == in_redis
    store = CaseStore(client, settings.keys)
    for case in store.get_many(in_redis):
        assert archive.read_case(case.case_id) == case


def test_archive_off_writes_nothing_to_disk(client, settings):
    publish_trades(client, settings.keys, [losing("x")])
    drain(client, settings, archive=False)
    assert client.scard(settings.keys.cases) == 1
    assert not settings.data_dir.exists()


# Arbitrary and malformed field maps: every entry ends as exactly one case, one win, or one
# dead letter, and nothing stays pending.
field_names = st.sampled_from(
    [
        "trade_id",
        "symbol",
        "side",
        "entry_price",
        "exit_price",
        "quantity",
        "leverage",
        "fee_rate",
        "features",
        "opened_at",
        "model_version",
        "json",
        "msgpack",
        "x",
    ]
)
field_values = st.one_of(
    st.binary(max_size=20),
    st.text(max_size=20).map(str.encode),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).encode()),
    st.sampled_from([b"BUY", b"SELL", b"3000", b"2970", b"[1,2,3]", orjson.dumps(FEATURES)]),
)
good_trades = st.builds(
    lambda i, side, entry, move: {
        "trade_id": f"h{i}",
        "symbol": "BTC/USDT",
        "side": side,
        "entry_price": entry,
        "exit_price": entry * (1 + move),
        "features": FEATURES,
    },
    st.integers(0, 10**9),
    st.sampled_from(["BUY", "SELL"]),
    st.floats(1, 1e5),
    st.floats(-0.5, 0.5),
)
entries = st.lists(
    st.one_of(
        st.dictionaries(field_names, field_values, min_size=1, max_size=8),
        good_trades.map(lambda t: {k.encode(): v for k, v in encode_trade(t, "flat").items()}),
        good_trades.map(lambda t: {b"json": orjson.dumps(t)}),
    ),
    min_size=1,
    max_size=25,
)


@hypothesis_settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=entries)
def test_every_entry_ends_as_one_case_one_win_or_one_dead_letter(client, settings, batch):
    client.flushall()
    ids = [client.xadd(settings.keys.trades, fields) for fields in batch]
    detector = drain(client, settings, archive=False)
    dead_ids = [f[b"dead:entry_id"] for _, f in client.xrange(settings.keys.trades_dead)]
    totals = detector.totals
    assert len(dead_ids) == len(set(dead_ids)) == totals.dead_lettered
    assert set(dead_ids) <= set(ids)
    assert totals.cases_added + totals.duplicates + totals.wins + totals.dead_lettered == len(ids)
    assert client.scard(settings.keys.cases) + client.scard(settings.keys.featureless) == (
        totals.cases_added
    )
    assert client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"] == 0


@pytest.mark.parametrize("encoding", ["flat", "json", "msgpack"])
def test_each_encoding_reaches_the_queue(client, settings, encoding):
    publish_trades(client, settings.keys, [losing("enc")], encoding)
    drain(client, settings, archive=False)
    blob = client.get(settings.keys.case(case_id_for("enc")))
    assert NegativeCase.from_msgpack(blob).trade_id == "enc"


def test_numbers_in_range_whose_product_is_not_are_dead_lettered(client, settings):
    # given a batch where two entries overflow the P&L and one is an ordinary loss
    publish_trades(
        client,
        settings.keys,
        [
            losing("huge-leverage", leverage=1e308, exit_price=1),
            losing("absurd-but-finite", leverage=1e300),
            losing("tiny-to-huge", entry_price=1e-300, exit_price=1e300, side="SELL"),
            losing("ordinary"),
        ],
    )
    # when drained, the detector survives, keeps the ordinary loss, and explains the others
    drain(client, settings)
    assert client.sismember(settings.keys.cases, case_id_for("ordinary"))
    assert client.sismember(settings.keys.cases, case_id_for("absurd-but-finite"))
    reasons = [f[b"dead:reason"] for _, f in client.xrange(settings.keys.trades_dead)]
    assert reasons == [b"entry: prices, quantity and leverage give a P&L that is not finite"] * 2
    assert client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"] == 0


def test_an_entry_with_thousands_of_fields_is_dead_lettered_whole(client, settings):
    junk = {f"f{i}".encode(): b"x" for i in range(5000)}
    client.xadd(settings.keys.trades, junk)
    publish_trades(client, settings.keys, [losing("after-junk")])
    drain(client, settings)
    ((_, dead),) = client.xrange(settings.keys.trades_dead)
    assert dead[b"dead:reason"] == b"entry: 5000 fields, over the limit of 256"
    assert msgpack.unpackb(dead[b"dead:original"], raw=True) == junk
    assert client.sismember(settings.keys.cases, case_id_for("after-junk"))


def test_trades_are_trimmed_but_never_an_unacknowledged_one(client, settings):
    keys = settings.keys
    live = LossDetector(client, dataclasses.replace(settings, trades_maxlen=50), "live", None)
    live.ensure_group()
    # given 100 handled trades, then two that a reader took and never acknowledged
    publish_and_ids(client, settings, [losing(f"a{i}") for i in range(100)])
    handle_new(client, settings, live)
    stuck = publish_and_ids(client, settings, [losing(f"s{i}") for i in range(2)])
    client.xreadgroup(DETECTOR_GROUP, "stuck", {keys.trades: ">"}, count=2)
    # when far more trades than the cap arrive and are handled
    publish_and_ids(client, settings, [losing(f"b{i}") for i in range(200)])
    handle_new(client, settings, live)
    # then everything before the unacknowledged entries is trimmed, and nothing after them
    assert [entry_id for entry_id, _ in client.xrange(keys.trades, count=2)] == stuck
    assert client.xlen(keys.trades) == 202
    # and once they are acknowledged, the next batch trims down to the cap
    client.xack(keys.trades, DETECTOR_GROUP, *stuck)
    publish_and_ids(client, settings, [losing("last")])
    handle_new(client, settings, live)
    assert client.xlen(keys.trades) == 50


def handle_new(client, settings, detector: LossDetector) -> None:
    """Hand every undelivered entry to the detector, 100 at a time."""
    while entries := entries_of(
        client.xreadgroup(DETECTOR_GROUP, detector.consumer, {settings.keys.trades: ">"}, 100)
    ):
        detector.handle(entries)


def publish_and_ids(client, settings, trades) -> list[bytes]:
    return [client.xadd(settings.keys.trades, encode_trade(t, "flat")) for t in trades]


def test_a_pending_entry_deleted_before_it_was_read_is_acknowledged(client, settings):
    # given an entry another detector read, which was then deleted from the stream
    keys = settings.keys
    (entry_id,) = publish_and_ids(client, settings, [losing("gone")])
    client.xgroup_create(keys.trades, DETECTOR_GROUP, id="0")
    client.xreadgroup(DETECTOR_GROUP, "dead-detector", {keys.trades: ">"})
    client.xdel(keys.trades, entry_id)
    # when a live detector claims what the dead one left
    drain(client, dataclasses.replace(settings, claim_idle_ms=1))
    # then nothing is left pending, and the loss of data is on record
    assert client.xpending(keys.trades, DETECTOR_GROUP)["pending"] == 0
    ((_, dead),) = client.xrange(keys.trades_dead)
    assert dead[b"dead:field"] == b"entry" and b"deleted" in dead[b"dead:reason"]


def test_a_group_that_has_read_nothing_keeps_every_trade(client, settings):
    # given a second consumer group on the trades stream that has read nothing yet
    keys = settings.keys
    live = LossDetector(client, dataclasses.replace(settings, trades_maxlen=10), "live", None)
    live.ensure_group()
    client.xgroup_create(keys.trades, "auditors", id="0")
    # when far more trades than the cap arrive and the detectors handle them all
    publish_and_ids(client, settings, [losing(f"g{i}") for i in range(60)])
    handle_new(client, settings, live)
    # then nothing is trimmed: the auditors have not seen any of it
    assert client.xlen(keys.trades) == 60
