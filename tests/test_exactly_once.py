"""Exactly-once effects: every counter counts each trade once, and each published update
finishes its cases in the same step, whatever is redelivered, retried or killed."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
import torch

from negcase.client.trades import publish_trades
from negcase.processes.detector import LossDetector
from negcase.processes.losses import outcome_of
from negcase.processes.trainer import Trainer
from negcase.runtime.settings import Settings
from negcase.runtime.shutdown import StopFlag
from negcase.schemas.trade import TradeDefaults, TradeError, validate_trade
from negcase.sim.engine import random_trades
from negcase.store.archive import Archive
from negcase.store.cases import version_label
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.keys import DETECTOR_GROUP
from negcase.store.streams import entries_of
from tests.conftest import run_burst, worker_env
from tests.training_cases import add_cases, assert_conserved, rule_cases

FEATURES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def trade(trade_id: str, exit_price: float, **extra: Any) -> dict[str, Any]:
    return {
        "trade_id": trade_id,
        "symbol": "ETH/USDT",
        "side": "BUY",
        "entry_price": 3000,
        "exit_price": exit_price,
        "features": FEATURES,
        **extra,
    }


def stats(client: redis.Redis, settings: Settings) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall(settings.keys.stats).items()}


def test_the_same_win_published_twice_counts_once(client, settings) -> None:
    # given the repro D: one winning trade, published twice (flat, then JSON)
    publish_trades(client, settings.keys, [trade("w1", 3100, model_version=4)], "flat")
    publish_trades(client, settings.keys, [trade("w1", 3100, model_version=4)], "json")
    publish_trades(client, settings.keys, [trade("l1", 2900, model_version=4)])
    # when drained
    run_burst(LossDetector(client, settings, "d", None))
    # then it counts once as a trade and a win, and the version's loss rate is 1 in 2
    counted = stats(client, settings)
    assert (counted["trades"], counted["wins"], counted["losses"]) == (2, 1, 1)
    assert (counted["model:4:trades"], counted["model:4:losses"]) == (2, 1)
    assert counted["duplicates"] == 1


def test_an_entry_recorded_by_two_detectors_counts_once(client, settings) -> None:
    # given entries detector A read and assessed, then (A being slow) B claimed and stored
    keys = settings.keys
    publish_trades(client, keys, [trade("w", 3100), trade("l", 2900)])
    client.xadd(keys.trades, {"trade_id": "bad", "entry_price": "-1"})
    slow, fast = (LossDetector(client, settings, name, None) for name in ("slow", "fast"))
    slow.ensure_group()
    entries = entries_of(client.xreadgroup(DETECTOR_GROUP, "slow", {keys.trades: ">"}))
    batch = slow.assess(entries)
    fast.handle([(entry_id, fields) for entry_id, fields in entries])
    # when A stores its batch after all
    slow.store(batch, len(entries))
    # then nothing is counted twice: one case, one win, one dead letter
    counted = stats(client, settings)
    assert (counted["trades"], counted["wins"], counted["dead_lettered"]) == (2, 1, 1)
    assert client.xlen(keys.trades_dead) == 1 and client.zcard(keys.queue) == 1
    assert "duplicates" not in counted  # the second recording had no effect at all


class Crash(BaseException):
    """A process dying at this very point (not an error anything catches)."""


def test_a_crash_right_after_publishing_applies_the_update_once(client, settings) -> None:
    # given a trainer that dies as soon as its update is published, before anything else
    torch.set_num_threads(1)
    quick = settings.with_overrides(lease_s=0.5, heldout_share=0.0, min_outcomes=0)
    add_cases(client, quick, rule_cases(1, epochs=20))
    victim = Trainer(client, quick, "victim", Archive(quick.data_dir))

    def die(*_args: object, **_kwargs: object) -> None:
        raise Crash

    victim.queue.ack = die  # type: ignore[method-assign]
    victim.sessions.completed = die  # type: ignore[method-assign]
    with pytest.raises(Crash):
        victim.run(StopFlag(), burst=True)
    # when another trainer drains the queue after the victim's lease ran out
    run_burst(Trainer(client, quick, "other", Archive(quick.data_dir)), timeout_s=120)
    # then the case's update was published once, and the case is done
    lineage = CheckpointRegistry(client, quick.keys, Archive(quick.data_dir)).list()
    learned = Counter(case_id for info in lineage for case_id in info.meta["case_ids"])
    assert learned == {"nc-test-00000": 1}
    assert assert_conserved(client, quick)["done"] == 1


def truth(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Every counter as it must read once every entry was handled exactly once."""
    counts: Counter[str] = Counter()
    sums: Counter[str] = Counter()
    seen: set[str] = set()
    for entry in entries:
        try:
            valid = validate_trade(entry, TradeDefaults())
            outcome = outcome_of(valid)
        except TradeError:
            counts["dead_lettered"] += 1
            continue
        if valid.trade_id in seen:
            counts["duplicates"] += 1
            continue
        seen.add(valid.trade_id)
        if valid.features is not None:
            counts["outcomes"] += 1
        label = version_label(valid.model_version)
        if valid.model_version is not None:
            counts[f"model:{label}:scored"] += 1  # its live window scores it once
        counts["trades"] += 1
        counts[f"model:{label}:trades"] += 1
        if outcome.is_loss:
            counts["losses"] += 1
            counts["cases_added"] += 1
            counts[f"model:{label}:losses"] += 1
            sums[f"model:{label}:loss_pct_sum"] += -outcome.pnl_pct
        else:
            counts["wins"] += 1
    return {**counts, **sums}


@pytest.mark.slow
def test_counters_match_the_truth_when_workers_are_killed_at_random(
    client, settings, spawn
) -> None:
    # given trades with model versions, malformed ones, and a fifth published again
    rng = random.Random(14)
    market = random_trades(14, prefix="k", malformed_share=0.05)
    entries = [next(market) for _ in range(400)]
    for entry in entries:
        entry["model_version"] = rng.choice([None, 1, 2])
    entries += rng.sample(entries, 80)
    rng.shuffle(entries)
    env = worker_env(
        settings,
        NEGCASE_LEASE_S="1",
        NEGCASE_BASE_EPOCHS="2,2,2,2,2",
        NEGCASE_EPOCH_MULTIPLIER="1",
        NEGCASE_VALIDATION_SIZE="20",
        NEGCASE_CASES_PER_CLAIM="3",
        NEGCASE_MIN_OUTCOMES="0",
    )
    detect = ("detect", "--batch-size", "10", "--claim-idle-ms", "200")
    # when detectors and trainers are killed at random moments of their work, again and again,
    # while the trades arrive
    cycles = 6
    for cycle in range(cycles):
        publish_trades(client, settings.keys, entries[cycle::cycles], "flat")
        detector = spawn(*detect, "--consumer", f"d{cycle % 2}", env=env)
        trainer = spawn("train", "--consumer", f"t{cycle}", env=env)
        _kill_once_busy(detector, lambda: client.xinfo_groups(settings.keys.trades), rng)
        _kill_once_busy(trainer, lambda: _started_count(client, settings), rng)
    # and then one of each drains what is left
    assert spawn(*detect, "--consumer", "final", "--burst", env=env).wait(120) == 0
    assert spawn("train", "--burst", "--consumer", "final", env=env).wait(180) == 0
    # then every counter reads as if each entry had been handled exactly once
    expected, counted = truth(entries), stats(client, settings)
    for name, value in expected.items():
        assert math.isclose(counted.get(name, 0), value, rel_tol=1e-9), name
    # (live_duplicates counts deliveries the live windows saw again, redeliveries included)
    unexpected = {n for n in counted if not n.startswith(("training_", "cases_"))}
    assert unexpected - {"live_duplicates"} <= expected.keys()
    assert client.xlen(settings.keys.trades_dead) == expected["dead_lettered"]
    assert client.xpending(settings.keys.trades, DETECTOR_GROUP)["pending"] == 0
    # and every case ended once, each update was published once with its cases finished
    counts = assert_conserved(client, settings)
    assert counts["queued"] == counts["leased"] == 0
    lineage = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir)).list()
    learned = Counter(case_id for info in lineage for case_id in info.meta["case_ids"])
    assert learned and max(learned.values()) == 1
    # and every session that started was closed exactly once
    started, closed = _sessions(client, settings)
    assert sorted(closed) == sorted(started) and not client.zcard(settings.keys.open_sessions)
    outcomes = Counter(closed.values())
    assert all(counted[f"training_{name}"] == n for name, n in outcomes.items()), outcomes
    # (a session killed right after its publish is closed as abandoned, not as published)
    announced = [
        f for _, f in client.xrange(settings.keys.checkpoints) if f[b"kind"] == b"published"
    ]
    assert len(announced) == len(lineage) >= counted["training_published"]


def _kill_once_busy(
    process: subprocess.Popen[str], progress: Callable[[], object], rng: random.Random
) -> None:
    """SIGKILL `process` a random moment after `progress()` changed (it is at work), or
    after a few seconds if it never does (nothing left for it to do)."""
    before = progress()
    deadline = time.monotonic() + 5
    while progress() == before and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(rng.uniform(0, 0.4))
    process.send_signal(signal.SIGKILL)
    process.wait()


def _started_count(client: redis.Redis, settings: Settings) -> int:
    return int(client.zcard(settings.keys.sessions))


def _sessions(client: redis.Redis, settings: Settings) -> tuple[list[str], dict[str, str]]:
    """Ids of sessions started, and the outcome each training_completed event gave."""
    started, closed = [], {}
    for _, fields in client.xrange(settings.keys.events):
        if fields[b"type"] == b"training_started":
            started.append(fields[b"session_id"].decode())
        elif fields[b"type"] == b"training_completed":
            session_id = fields[b"session_id"].decode()
            assert session_id not in closed, f"{session_id} closed twice"
            closed[session_id] = fields[b"outcome"].decode()
    return started, closed
