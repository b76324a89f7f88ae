"""Partitions on one server: the key-name rule, publishing by symbol, the trainer's claim
across partitions, and a publish whose trainer died before it finished its cases."""

from __future__ import annotations

import dataclasses
import json
import random
import zlib

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from negcase.cli.cluster_metrics import ClusterCollector
from negcase.cli.dashboard import snapshot
from negcase.cli.status import gather_status
from negcase.client.trades import publish_trades
from negcase.processes.detector import LossDetector
from negcase.runtime.settings import Settings
from negcase.schemas.case import case_id_for
from negcase.store.archive import Archive
from negcase.store.cases import CaseStore
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.keys import Keys, partition_namespace, partition_of
from negcase.store.leases import LeaseLost
from negcase.store.partitions import CaseQueues
from tests.conftest import negcase, run_burst, wait_until
from tests.training_cases import make_case, random_features, redis_now_ms


def test_a_symbol_always_maps_to_the_same_partition_by_crc32() -> None:
    # given the rule other languages follow: CRC-32 of the UTF-8 symbol, mod N
    for symbol in ("ETH/USDT", "BTC/USDT", "SOL/USDT", "ÉTH/€"):
        expected = zlib.crc32(symbol.encode("utf-8")) % 3
        # then it is that partition, every time, and partition 0 with one partition
        assert {partition_of(symbol, 3) for _ in range(5)} == {expected}
        assert partition_of(symbol, 1) == 0
    # and the figures the README quotes for other languages to check against
    assert (partition_of("ETH/USDT", 3), partition_of("SOL/USDT", 3)) == (1, 0)


def test_one_partition_is_todays_layout_and_more_carry_a_tag_each() -> None:
    # given the default namespace and a Cluster one
    plain, tagged = Keys("negcase"), Keys("{negcase}")
    # then one partition is the namespace itself: the same key names as before partitions
    assert plain.partition(0, 1) is plain and plain.partitioned(1) == [plain]
    assert Settings().partition_keys == [Settings().keys]
    assert plain.partition(0, 1).queue == "negcase:queue"
    # and with three, each partition's keys carry a tag of its own
    assert [k.queue for k in tagged.partitioned(3)] == [
        "{negcase:p0}:queue",
        "{negcase:p1}:queue",
        "{negcase:p2}:queue",
    ]
    assert partition_namespace("app:{negcase}", 2) == "app:{negcase:p2}"
    assert plain.partition(1, 3).trades == "negcase:p1:trades"


def test_publishing_sends_each_symbol_to_its_partition_in_order(
    client: redis.Redis, settings: Settings
) -> None:
    # given three partitions and trades of three symbols, interleaved
    keys = settings.keys
    symbols = ["ETH/USDT", "BTC/USDT", "SOL/USDT"]
    trades = [{"trade_id": f"t{i}", "symbol": symbols[i % 3]} for i in range(12)]
    # when they are published
    assert publish_trades(client, keys, trades, partitions=3) == 12
    # then each symbol's trades are in its partition's stream, in the order sent
    for symbol in symbols:
        stream = keys.partition(partition_of(symbol, 3), 3).trades
        ids = [
            f[b"trade_id"].decode()
            for _, f in client.xrange(stream)
            if f[b"symbol"] == symbol.encode()
        ]
        assert ids == [t["trade_id"] for t in trades if t["symbol"] == symbol]
    # and nothing went to the unpartitioned stream
    assert client.xlen(keys.trades) == 0


def partitioned_cases(client: redis.Redis, keys: Keys, priorities: list[list[int]]) -> None:
    """Queue cases in each partition p with the priorities priorities[p]."""
    n = 0
    for p, wanted in enumerate(priorities):
        cases = []
        for priority in wanted:
            n += 1
            cases.append(make_case(n, random_features(random.Random(n)), priority=priority))
        CaseStore(client, keys.partition(p, len(priorities))).add(cases, "test")


def test_the_cross_partition_claim_takes_the_highest_priority_case(
    client: redis.Redis, settings: Settings
) -> None:
    # given three partitions whose best cases are priority 2, 5 and 3
    keys = settings.keys
    partitioned_cases(client, keys, [[1, 2], [5, 1], [3]])
    queues = CaseQueues.of(client, keys, 3, lease_s=30)
    # when a trainer claims, one case at a time
    claimed = [queues.claim("t1")[0] for _ in range(5)]
    # then it takes them best first, each from the partition that holds it
    assert [round(lease.score) // 100_000 for lease in claimed] == [5, 3, 2, 1, 1]
    assert [lease.partition for lease in claimed[:3]] == [1, 2, 0]
    # and every partition's books balance, with nothing left to claim
    assert queues.claim("t1") == []
    counts = queues.counts()
    assert (counts["leased"], counts["queued"], counts["total"]) == (5, 0, 5)
    # and acks go to each lease's own partition
    queues.ack(claimed)
    assert queues.counts()["done"] == 5


def test_a_case_published_by_a_trainer_that_died_before_its_ack_is_not_published_again(
    client: redis.Redis, settings: Settings
) -> None:
    # given a partitioned queue and a trainer holding a short lease on its one case
    keys = settings.keys
    partitioned_cases(client, keys, [[], [4]])
    queues = CaseQueues.of(client, keys, 2, lease_s=0.5)
    registry = CheckpointRegistry(client, keys, queues=queues)
    [lease] = queues.claim("t1")
    weights = _weights()
    # when it publishes (the lineage records the case) and dies before finishing the case
    status, _ = registry._publish_recording(1, weights, "sha", b"{}", None, [lease], "t1", [])
    assert status == b"published"
    # then once the lease lapses, a reap that read `learned` before the publish wrote it (the
    # partition's own reap, which is told of no learned case) queues the case again
    wait_until(lambda: redis_now_ms(client) > lease.deadline_ms, 20, "the lease to lapse")
    assert queues.queues[1].reap() == 1 and queues.counts()["queued"] == 1
    # and the next claim finishes it as learned instead of handing it out to train again
    assert queues.claim("t2") == []
    counts = queues.counts()
    assert (counts["done"], counts["queued"], counts["leased"]) == (1, 0, 0)
    # and a requeue by an operator makes it trainable and publishable again
    case = CaseStore(client, keys.partition(1, 2)).get(lease.case_id)
    assert queues.requeue([case], partition=1) == 1
    assert client.zscore(keys.learned, lease.case_id) is None
    assert [again.case_id for again in queues.claim("t3")] == [lease.case_id]


def test_a_learned_case_whose_lease_lapses_at_its_last_attempt_is_done_not_dead(
    client: redis.Redis, settings: Settings
) -> None:
    # given a case on its last attempt, published by a trainer that died before its ack
    keys = settings.keys
    partitioned_cases(client, keys, [[], [4]])
    queues = CaseQueues.of(client, keys, 2, lease_s=0.5, max_attempts=1)
    registry = CheckpointRegistry(client, keys, queues=queues)
    [lease] = queues.claim("t1")
    status, _ = registry._publish_recording(1, _weights(), "sha", b"{}", None, [lease], "t1", [])
    assert status == b"published"
    # when its lease lapses and the reaper runs
    wait_until(lambda: redis_now_ms(client) > lease.deadline_ms, 20, "the lease to lapse")
    assert queues.reap() == 1
    # then the case is done, as its update is in the lineage: not dead, not queued
    counts = queues.counts()
    assert (counts["done"], counts["dead"], counts["queued"], counts["leased"]) == (1, 0, 0, 0)


def test_a_paused_trainers_publish_wins_once_and_the_next_holders_publish_is_refused(
    client: redis.Redis, settings: Settings
) -> None:
    # given case X claimed by t1, whose lease lapses and is reaped, then X and Y claimed by t2
    keys = settings.keys
    partitioned_cases(client, keys, [[], [4, 3]])
    queues = CaseQueues.of(client, keys, 2, lease_s=0.5)
    registry = CheckpointRegistry(client, keys, queues=queues)
    [first] = queues.claim("t1")
    wait_until(lambda: redis_now_ms(client) > first.deadline_ms, 20, "the lease to lapse")
    wait_until(lambda: queues.reap() or queues.counts()["leased"] == 0, 20, "the reap")
    held = CaseQueues.of(client, keys, 2, lease_s=30).claim("t2", count=2)
    assert len(held) == 2
    assert held[0].case_id == first.case_id
    # when t1, paused between its lease check and its publish, publishes X first
    status, _ = registry._publish_recording(1, _weights(), "sha", b"{}", None, [first], "t1", [])
    assert status == b"published"
    # then t2's publish of X and Y is refused: no case's update is published twice
    with pytest.raises(LeaseLost):
        registry.publish(_weights(), "sha2", {}, 1, held, "t2")
    assert client.get(keys.latest) == b"1"
    # and X is finished, as learned, while Y goes back to the queue to be trained
    counts = queues.counts()
    assert (counts["done"], counts["queued"], counts["leased"]) == (1, 1, 0)
    queued = client.zrange(keys.partition(1, 2).queue, 0, -1)
    assert queued == [held[1].case_id.encode()]


def test_a_partitioned_publish_finishes_its_cases_at_once_and_checks_its_leases_first(
    client: redis.Redis, settings: Settings
) -> None:
    # given a case in each of two partitions, claimed under a long lease
    keys = settings.keys
    partitioned_cases(client, keys, [[3], [4]])
    queues = CaseQueues.of(client, keys, 2, lease_s=30)
    registry = CheckpointRegistry(client, keys, queues=queues)
    [lease] = queues.claim("t1")
    store = CaseStore(client, keys.partition(lease.partition, 2))
    case = store.get(lease.case_id)
    trained = dataclasses.replace(case, retraining_count=case.retraining_count + 1)
    # when its trainer publishes the update
    blobs = {lease.case_id: trained.to_msgpack()}
    assert registry.publish(_weights(), "sha", {}, None, [lease], "t1", blobs) == 1
    # then the case is done at once with its update, not left leased for the reaper
    counts = queues.counts()
    assert (counts["done"], counts["leased"], counts["queued"]) == (1, 0, 1)
    assert store.get(lease.case_id).retraining_count == case.retraining_count + 1
    # and a trainer whose lease lapsed publishes nothing: the leases are checked first
    [late] = CaseQueues.of(client, keys, 2, lease_s=0.5).claim("t2")
    wait_until(lambda: redis_now_ms(client) > late.deadline_ms, 20, "the lease to lapse")
    with pytest.raises(LeaseLost):
        registry.publish(_weights(), "sha2", {}, 1, [late], "t2")
    assert client.get(keys.latest) == b"1"
    assert queues.heartbeat([late]) == [late.case_id]


def _weights() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(2)})


# Two symbols in each of three partitions (partition_of: 1, 1, 0, 0, 2, 2).
SYMBOLS = ["ETH/USDT", "BTC/USDT", "SOL/USDT", "DOGE/USDT", "DOT/USDT", "NEAR/USDT"]


def partitioned_losses(count: int, prefix: str = "pl") -> list[dict[str, object]]:
    """`count` losing BUYs with features, spread over SYMBOLS (so over every partition)."""
    rng = random.Random(prefix)
    return [
        {
            "trade_id": f"{prefix}-{n}",
            "symbol": SYMBOLS[n % len(SYMBOLS)],
            "side": "BUY",
            "entry_price": 3000,
            "exit_price": 2970 - n,
            "features": random_features(rng),
        }
        for n in range(count)
    ]


def test_operator_commands_find_each_case_in_its_own_partition(
    client: redis.Redis, settings: Settings
) -> None:
    # given three partitions, detected losses on six symbols, archived, all of them dead
    three = settings.with_overrides(partitions=3, max_attempts=1, heldout_share=0.0)
    trades = partitioned_losses(12)
    publish_trades(client, three.keys, trades, partitions=3)
    archive = Archive(three.data_dir)
    for p in range(3):
        run_burst(LossDetector(client, three, "d", archive, p))
    queues = CaseQueues.of(client, three.keys, 3, lease_s=30, max_attempts=1)
    while leases := queues.claim("t", 12):
        queues.fail(leases, "CUDA out of memory", "t")
    assert queues.counts()["dead"] == 12
    home = {case_id_for(str(t["trade_id"])): partition_of(str(t["symbol"]), 3) for t in trades}
    assert len(set(home.values())) == 3
    # when an operator looks one up by its trade id
    shown = negcase(three, "case", "pl-5", "--json")
    # then it is found in its partition, with its state there
    assert shown.returncode == 0, shown.stderr
    state = json.loads(shown.stdout)["state"]
    assert state["state"] == "dead" and state["partition"] == home[case_id_for("pl-5")]
    assert "CUDA" in state["last_error"]
    # when one dead case is requeued by id, with an id that is nowhere
    one = case_id_for("pl-4")
    requeued = negcase(three, "requeue", "--dead", one, "nc-nowhere")
    # then that one is queued in its own partition and the other is named and left alone
    assert requeued.returncode == 1 and "nc-nowhere: not dead" in requeued.stdout
    assert "queued 1 dead case(s)" in requeued.stdout
    assert client.zscore(three.keys.partition(home[one], 3).queue, one) is not None
    # when the rest are requeued, then every partition's dead set is empty
    assert "queued 11 dead" in negcase(three, "requeue", "--dead").stdout
    assert (queues.counts()["queued"], queues.counts()["dead"]) == (12, 0)
    # when every case is trained (done) and retrain-all queues them again
    while leases := queues.claim("t", 12):
        queues.ack(leases)
    assert "queued 12 cases" in negcase(three, "retrain-all").stdout
    # then each is queued in its own partition, in none other
    for case_id, p in home.items():
        for q, keys in enumerate(three.partition_keys):
            assert (client.zscore(keys.queue, case_id) is not None) == (p == q)
    # when Redis lost everything and the archive is replayed
    client.flushall()
    restored = negcase(three, "retrain-all", "--from-archive", str(three.data_dir))
    # then each case is back in the partition its symbol picks
    assert "queued 12 cases" in restored.stdout, restored.stderr
    for case_id, p in home.items():
        assert client.zscore(three.keys.partition(p, 3).queue, case_id) is not None
    assert client.zcard(three.keys.queue) == 0


def test_status_memory_dashboard_and_gauges_count_every_partition(
    client: redis.Redis, settings: Settings
) -> None:
    # given three partitions holding 12 cases, detected by one detector per partition
    three = settings.with_overrides(partitions=3)
    publish_trades(client, three.keys, partitioned_losses(12), partitions=3)
    for p in range(3):
        run_burst(LossDetector(client, three, "d", None, p))
    # when the status, the dashboard's snapshot and the gauges are read
    status = gather_status(client, three.keys, 3)
    page = snapshot(client, three.keys, 3)
    registry = CollectorRegistry()
    registry.register(ClusterCollector(client, three.keys, 3))
    gauges = {
        (sample.name, sample.labels.get("state")): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    # then each counts the cases of every partition
    assert status["cases"]["total"] == 12
    assert status["memory"]["families"]["case blobs"]["keys"] == 12
    assert status["memory"]["families"]["trades stream"]["keys"] == 3
    assert len(page["recent_cases"]) == 10  # the newest ten, from the partitions' events
    assert page["status"]["cases"]["queued"] == 12
    assert gauges[("negcase_cases", "queued")] == 12
    # and one partition alone is today's status: its own keys only
    assert gather_status(client, three.keys)["memory"]["families"]["case blobs"]["keys"] == 0


def test_single_partition_tools_refuse_several_partitions(settings: Settings) -> None:
    # given a deployment of three partitions
    three = settings.with_overrides(partitions=3)
    # when a tool that runs on one partition in its own namespace is started
    for args in (["bench", "soak", "--trades", "10"], ["bench", "ingest", "--events", "10"]):
        result = negcase(three, *args)
        # then it refuses with one line that says why, rather than misread its data
        assert result.returncode != 0 and "NEGCASE_PARTITIONS is 3" in result.stderr, args
