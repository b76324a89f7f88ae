"""The whole loop on three partitions with real processes: a detector of every partition and
two trainers, one of them SIGKILLed mid-run and restarted; nothing lost, nothing done twice,
and `negcase status --json` adds the partitions up to the truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter

import redis

from negcase.client.trades import publish_trades
from negcase.runtime.settings import Settings
from negcase.schemas.case import case_id_for
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.keys import partition_of
from negcase.store.partitions import CaseQueues
from tests.conftest import wait_until, worker_env
from tests.test_partitions import SYMBOLS, negcase, partitioned_losses

PARTITIONS = 3
LOSSES = 36
WINS = 12


def wins(count: int) -> list[dict[str, object]]:
    """Winning BUYs on every symbol: counted, never a case."""
    return [
        {
            "trade_id": f"win-{n}",
            "symbol": SYMBOLS[n % len(SYMBOLS)],
            "side": "BUY",
            "entry_price": 3000,
            "exit_price": 3100,
        }
        for n in range(count)
    ]


def test_three_partitions_lose_nothing_and_do_nothing_twice_when_a_trainer_is_killed(
    client: redis.Redis, settings: Settings, spawn
) -> None:
    # given three partitions and trades on six symbols (two per partition): half of the
    # losses now, the other half once a first trainer is claiming
    three = settings.with_overrides(partitions=PARTITIONS, heldout_share=0.0)
    losses = partitioned_losses(LOSSES, prefix="pp")
    first_half, second_half = losses[: LOSSES // 2], losses[LOSSES // 2 :]
    publish_trades(client, three.keys, [*first_half, *wins(WINS)], partitions=PARTITIONS)
    # A 4 s lease: a trainer's heartbeat thread stalled for a second on a loaded machine
    # must not lose its lease (three lost leases make a case dead).
    env = worker_env(
        three,
        NEGCASE_LEASE_S="4",
        NEGCASE_BASE_EPOCHS="2,2,2,2,2",
        NEGCASE_EPOCH_MULTIPLIER="1",
        NEGCASE_VALIDATION_SIZE="10",
        NEGCASE_CASES_PER_CLAIM="2",
        NEGCASE_MIN_OUTCOMES="0",
    )
    queues = CaseQueues.of(client, three.keys, PARTITIONS)
    # when one detector consumes every partition and a first trainer claims
    detector = spawn("detect", "--consumer", "d", "--block-ms", "100", env=env)
    victim = spawn("train", "--consumer", "t1", env=env)
    # (the second trainer starts only now: started together, it could drain every case
    # while the first still imports torch, and the first would never hold a lease)
    wait_until(lambda: _holds_leases(client, three, "t1"), 60, "t1 to hold a lease")
    # and a second trainer joins, with the second half of the losses
    other = spawn("train", "--consumer", "t2", env=env)
    publish_trades(client, three.keys, second_half, partitions=PARTITIONS)
    # and the first trainer is SIGKILLed while it holds leases, then restarted
    wait_until(lambda: _paused_holding_leases(victim, client, three, "t1"), 60, "t1 held")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    restarted = spawn("train", "--consumer", "t1-again", env=env)
    wait_until(lambda: _all_finished(queues, LOSSES), 90, "every case to be trained or refused")
    for process in (detector, other, restarted):
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, process.communicate()[1][-2000:]
    # then every loss became exactly one case, in the partition its symbol picks
    expected = {case_id_for(str(t["trade_id"])): partition_of(str(t["symbol"]), 3) for t in losses}
    stored = {
        case_id.decode(): p
        for p, keys in enumerate(three.partition_keys)
        for case_id in client.smembers(keys.cases)
    }
    assert stored == expected
    # and each was published in exactly one checkpoint or refused by the gate, never both
    lineage = CheckpointRegistry(client, three.keys, Archive(three.data_dir)).list()
    learned = Counter(case_id for info in lineage for case_id in info.meta["case_ids"])
    rejected = {
        case_id.decode() for keys in three.partition_keys for case_id in client.hkeys(keys.rejected)
    }
    assert learned and max(learned.values()) == 1
    assert not set(learned) & rejected and set(learned) | rejected == set(expected)
    # and the status adds the partitions up to the truth
    shown = negcase(three, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    cases, counters = status["cases"], status["counters"]
    assert (cases["total"], cases["done"], cases["dead"]) == (LOSSES, LOSSES, 0)
    assert cases["conserved"] and cases["rejected"] == len(rejected)
    assert (counters["trades"], counters["losses"], counters["wins"]) == (
        LOSSES + WINS,
        LOSSES,
        WINS,
    )
    assert counters["cases_added"] == LOSSES
    assert [p["cases"]["total"] for p in status["partitions"]] == [
        list(expected.values()).count(p) for p in range(PARTITIONS)
    ]
    assert status["trades"]["stream_length"] == LOSSES + WINS
    assert status["trades"]["pending"] == 0
    assert status["memory"]["families"]["case blobs"]["keys"] == LOSSES


def _holds_leases(client: redis.Redis, settings: Settings, trainer: str) -> bool:
    """Whether `trainer` holds a lease in any partition (a claim lands in one)."""
    for keys in settings.partition_keys:
        for record in client.hvals(keys.leases):
            if trainer.encode() in record:
                return True
    return False


def _paused_holding_leases(
    process: subprocess.Popen[str], client: redis.Redis, settings: Settings, trainer: str
) -> bool:
    """Stop `process` (SIGSTOP); true if it holds a lease, and it stays stopped, so that
    a kill lands mid-lease; otherwise it continues (SIGCONT) and the answer is false."""
    process.send_signal(signal.SIGSTOP)
    os.waitpid(process.pid, os.WUNTRACED)  # SIGSTOP is delivered asynchronously
    if _holds_leases(client, settings, trainer):
        return True
    process.send_signal(signal.SIGCONT)
    return False


def _all_finished(queues: CaseQueues, cases: int) -> bool:
    counts = queues.counts()
    return counts["total"] == cases and counts["done"] + counts["dead"] == cases
