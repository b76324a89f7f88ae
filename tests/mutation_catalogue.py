"""The bugs `python -m tests.mutations` plants, one at a time: each a plausible mistake in a
core invariant, written as (file, exact old text, new text, the tests aimed at it). Tests are
listed fastest first: the check stops at the first one that fails."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Mutation:
    """One planted bug: `old` (found exactly once in `file`) becomes `new`."""

    area: str
    bug: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


LOSSES = ("tests/test_losses.py", "tests/test_detector.py")
VALIDATION = ("tests/test_trade_schema.py", "tests/test_detector.py")
QUEUE = ("tests/test_queue.py",)
LEASES = ("tests/test_queue.py", "tests/test_checkpoints.py", "tests/test_trainer.py")
# The stories of a trainer paused past its lease: a real process, stopped and resumed.
PAUSED = (
    "tests/test_trainer.py::"
    "test_a_trainer_paused_past_its_lease_cannot_publish_and_its_case_dies_at_the_limit",
    "tests/test_trainer.py::"
    "test_a_trainer_paused_past_its_lease_cannot_publish_or_ack_over_the_next_holder",
    "tests/test_trainer.py::"
    "test_a_trainer_paused_mid_training_stops_when_its_heartbeat_finds_the_lease_gone",
)
MODEL = ("tests/test_model.py", "tests/test_predictor.py")
# The gate's own tests first (fast), then the stories that drive it through a trainer.
GATE = (
    "tests/test_learning.py::test_the_trading_gate_has_no_tolerance",
    "tests/test_learning.py::test_after_a_rebase_the_gate_judges_against_the_latest_model",
    "tests/test_learning.py::test_a_candidate_whose_output_overflows_is_never_published",
    "tests/test_learning.py::test_a_candidate_whose_output_is_not_finite_is_never_published",
    "tests/test_learning.py::test_an_update_that_trades_worse_than_its_parent_on_the_window_is_refused",
    "tests/test_learning.py::test_the_gate_refuses_a_harmful_update_and_says_why",
)
RELOAD = ("tests/test_predictor.py", "tests/test_reload.py")
PARTITIONS = ("tests/test_partitions.py", "tests/test_partition_processes.py")

MUTATIONS: tuple[Mutation, ...] = (
    # Losses and priorities
    Mutation(
        "losses",
        "priority thresholds are not strict (>= for >)",
        "workers/processes/losses.py",
        "if loss_pct > threshold:",
        "if loss_pct >= threshold:",
        LOSSES,
    ),
    Mutation(
        "losses",
        "a break-even trade counts as a loss",
        "workers/processes/losses.py",
        "return self.pnl_pct < 0",
        "return self.pnl_pct <= 0",
        LOSSES,
    ),
    Mutation(
        "losses",
        "a SELL's move is not turned round",
        "workers/processes/losses.py",
        'if trade.side == "SELL":\n        move = -move',
        'if trade.side == "BUY":\n        move = -move',
        LOSSES,
    ),
    Mutation(
        "losses",
        "fees are added to the P&L instead of taken off",
        "workers/processes/losses.py",
        "pnl_pct = round((move - trade.fee_rate) * trade.leverage * 100, 9)",
        "pnl_pct = round((move + trade.fee_rate) * trade.leverage * 100, 9)",
        LOSSES,
    ),
    Mutation(
        "losses",
        "hindsight says BUY for a rise short of the minimum profitable move",
        "schemas/outcome.py",
        "if market_move >= min_move and market_move > fee_rate:",
        "if market_move > fee_rate:",
        LOSSES,
    ),
    Mutation(
        "losses",
        "a held-out decision's outcome is replayed (trained on) instead of judging",
        "store/record_batch.lua",
        "      if ARGV[at + 10] == '1' then",
        "      if false then",
        (
            "tests/test_learning.py::test_held_out_outcomes_only_judge_and_every_other_outcome_is_replayed",
        ),
    ),
    Mutation(
        "losses",
        "the held-out rule is applied to the trade id, not the case id",
        "workers/processes/detector.py",
        "held_out = is_held_out(case_id_for(trade.trade_id), self.settings.heldout_share)",
        "held_out = is_held_out(trade.trade_id, self.settings.heldout_share)",
        (
            "tests/test_learning.py::test_held_out_outcomes_only_judge_and_every_other_outcome_is_replayed",
        ),
    ),
    # Validation
    Mutation(
        "validation",
        "a price of zero passes (the lower bound is not exclusive)",
        "schemas/trade.py",
        "if low_excluded and not value > low:",
        "if low_excluded and not value >= low:",
        VALIDATION,
    ),
    Mutation(
        "validation",
        "an infinite number passes",
        "schemas/trade.py",
        "    if not math.isfinite(value):\n        raise TradeError(name",
        "    if False:\n        raise TradeError(name",
        VALIDATION,
    ),
    Mutation(
        "validation",
        "a NaN feature slips through the range check (whole-number features)",
        "schemas/trade.py",
        "if not _is_number(item) or not -FLOAT32_MAX <= item <= FLOAT32_MAX:",
        "if not _is_number(item) or abs(item) > FLOAT32_MAX:",
        VALIDATION,
    ),
    Mutation(
        "validation",
        "a case with non-finite features is trained",
        "schemas/case.py",
        "isinstance(x, int | float) and -FLOAT32_MAX <= x <= FLOAT32_MAX for x in features",
        "isinstance(x, int | float) and not abs(x) > FLOAT32_MAX for x in features",
        (
            "tests/test_trainer.py::"
            "test_a_stored_case_that_cannot_be_trained_is_failed_with_its_reason",
            "tests/test_trainer.py::test_cases_that_always_fail_end_dead_while_others_flow",
        ),
    ),
    # Idempotency
    Mutation(
        "idempotency",
        "a redelivered trade is recorded again (the duplicate check skipped)",
        "store/record_batch.lua",
        "elseif kind ~= 'dead' and (in_batch[key] or redis.call('ZSCORE', seen, key)",
        "elseif kind ~= 'dead' and false and (in_batch[key] or redis.call('ZSCORE', seen, key)",
        ("tests/test_detector.py", "tests/test_detector_processes.py"),
    ),
    Mutation(
        "idempotency",
        "a batch's entries are never acknowledged",
        "store/record_batch.lua",
        "if #acks > 0 then redis.call('XACK', trades, group, unpack(acks)) end",
        "",
        ("tests/test_detector.py", "tests/test_detector_processes.py"),
    ),
    # Leases and fencing
    Mutation(
        "leases",
        "fencing: any token holds the lease",
        "store/lease.lua",
        "return lease.token == tonumber(token)",
        "return true",
        LEASES,
    ),
    Mutation(
        "leases",
        "a lease past its deadline still holds",
        "store/lease.lua",
        "if not lease or not deadline or tonumber(deadline) <= now_ms then return false end",
        "if not lease or not deadline then return false end",
        LEASES,
    ),
    Mutation(
        "leases",
        "a heartbeat extends a lease it no longer holds",
        "store/heartbeat.lua",
        "if lease_holds(leased, leases, case_id, ARGV[i + 1], now_ms) then",
        "if true then",
        LEASES,
    ),
    Mutation(
        "leases",
        "ack does not check the leases",
        "store/ack.lua",
        "if not lease_holds(k.leased, k.leases, ARGV[i], ARGV[i + 1], now_ms) then",
        "if false then",
        LEASES,
    ),
    Mutation(
        "leases",
        "publish does not check the leases",
        "store/publish_checkpoint.lua",
        "if not lease_holds(k.leased, k.leases, ARGV[i], ARGV[i + 1], now_ms) then",
        "if false then",
        LEASES,
    ),
    Mutation(
        "leases",
        "a stale token can give a case back",
        "store/give_back.lua",
        "if lease and lease.token == token then",
        "if lease then",
        LEASES,
    ),
    Mutation(
        "leases",
        "the fencing counter is never saved: tokens repeat",
        "store/claim.lua",
        "if #picked > 0 then redis.call('SET', fencing, string.format('%d', token)) end",
        "",
        LEASES,
    ),
    # Reaping
    Mutation(
        "reaping",
        "the reaper lets a case past its attempt limit go round again (> for >=)",
        "store/reap.lua",
        "dead = tries >= max_attempts,",
        "dead = tries > max_attempts,",
        (*QUEUE, *PAUSED),
    ),
    Mutation(
        "reaping",
        "the reaper does not count an expired lease as an attempt",
        "store/reap.lua",
        "local tries = (tonumber(redis.call('HGET', attempts, case_id)) or 0) + 1",
        "local tries = tonumber(redis.call('HGET', attempts, case_id)) or 0",
        (*QUEUE, *PAUSED),
    ),
    Mutation(
        "reaping",
        "the reaper takes back live leases too",
        "store/reap.lua",
        "redis.call('ZRANGEBYSCORE', leased, '-inf', now_ms,",
        "redis.call('ZRANGEBYSCORE', leased, '-inf', '+inf',",
        (*QUEUE, "tests/test_trainer.py"),
    ),
    Mutation(
        "reaping",
        "a failed attempt at the limit is queued again (> for >=)",
        "store/give_back.lua",
        "plan.outcome = tries >= max_attempts and 'dead' or 'queued'",
        "plan.outcome = tries > max_attempts and 'dead' or 'queued'",
        (*QUEUE, "tests/test_trainer.py"),
    ),
    # The gate: the candidate's trading result on the validation window against its parent's
    Mutation(
        "gate",
        "the gate's comparison is the wrong way round",
        "workers/processes/training.py",
        "if candidate.mean_pnl_pct < parent.mean_pnl_pct - 1e-12:",
        "if candidate.mean_pnl_pct > parent.mean_pnl_pct + 1e-12:",
        GATE,
    ),
    Mutation(
        "gate",
        "the gate tolerates a 2 % fall in mean P&L (it must have no tolerance)",
        "workers/processes/training.py",
        "if candidate.mean_pnl_pct < parent.mean_pnl_pct - 1e-12:",
        "if candidate.mean_pnl_pct < parent.mean_pnl_pct - abs(parent.mean_pnl_pct) * 0.02:",
        GATE,
    ),
    Mutation(
        "gate",
        "at equal P&L the gate lets the loss rate rise",
        "workers/processes/training.py",
        "worse_rate = (candidate.loss_rate or 0.0) > (parent.loss_rate or 0.0)",
        "worse_rate = (candidate.loss_rate or 0.0) < (parent.loss_rate or 0.0)",
        GATE,
    ),
    Mutation(
        "gate",
        "a candidate whose output is not finite is judged like any other",
        "workers/processes/training.py",
        "if candidate is not None and not math.isfinite(candidate.mean_pnl_pct):",
        "if False:",
        GATE,
    ),
    Mutation(
        "gate",
        "a model with non-finite output gets a finite trading result",
        "workers/processes/training.py",
        "if not torch.isfinite(logits).all():",
        "if False:",
        GATE,
    ),
    Mutation(
        "gate",
        "every update is judged for finite output only, as the first checkpoint is",
        "workers/processes/publishing.py",
        "judged_against = None if parent is None else result.trading_before",
        "judged_against = None",
        GATE,
    ),
    Mutation(
        "gate",
        "a candidate with a NaN weight reaches the gate (the weights are not checked)",
        "workers/processes/publishing.py",
        "            if diverged is not None:\n",
        "            if False:\n",
        GATE,
    ),
    Mutation(
        "gate",
        "after a rebase the gate measures against the stale base, not the latest model",
        "workers/processes/publishing.py",
        "result.trading_before = _trading_result_of(scratch, parent_state, window)",
        "result.trading_before = _trading_result_of(scratch, update.base_state, window)",
        GATE,
    ),
    # Publishing and rebasing
    Mutation(
        "publishing",
        "a rebase drops the other trainer's update",
        "workers/processes/model.py",
        "return {name: latest[name] + (trained[name] - base[name]) for name in latest}",
        "return {name: trained[name] for name in latest}",
        ("tests/test_model.py", "tests/test_learning.py"),
    ),
    Mutation(
        "publishing",
        "publish does not compare-and-set latest",
        "store/store_checkpoint.lua",
        "if current ~= expected then return {'conflict', current} end",
        "",
        ("tests/test_checkpoints.py", "tests/test_learning.py"),
    ),
    Mutation(
        "publishing",
        "a publisher that lost the race does not rebase (publishes its update as trained)",
        "workers/processes/publishing.py",
        "candidate = rebased(parent_state, update.trained_state, update.base_state)",
        "candidate = update.trained_state",
        ("tests/test_learning.py",),
    ),
    # Checkpoint verification
    Mutation(
        "checkpoints",
        "the sha256 is not checked",
        "workers/processes/model.py",
        "if sha256_hex(stored.weights) != stored.sha256:",
        "if False:",
        MODEL,
    ),
    Mutation(
        "checkpoints",
        "non-finite weights are loaded",
        "workers/processes/model.py",
        "if not bool(torch.isfinite(tensors[name]).all()):",
        "if False:",
        MODEL,
    ),
    Mutation(
        "checkpoints",
        "a checkpoint for another feature count is loaded",
        "workers/processes/model.py",
        'if stored.meta.get("feature_count") != feature_count:',
        "if False:",
        MODEL,
    ),
    Mutation(
        "checkpoints",
        "the model spec in the metadata is not compared with the worker's",
        "workers/processes/reloader.py",
        "    if theirs != spec:\n        raise SpecMismatch(",
        "    if False:\n        raise SpecMismatch(",
        RELOAD,
    ),
    # Partitions
    Mutation(
        "partitions",
        "a symbol's partition comes from Python's per-process string hash, not CRC-32",
        "store/keys.py",
        'return zlib.crc32(symbol.encode("utf-8")) % partitions',
        "return hash(symbol) % partitions",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "the cross-partition claim starts at the partition whose best case is the worst",
        "store/partitions.py",
        "return [partition for _, partition in sorted(heads, reverse=True)]",
        "return [partition for _, partition in sorted(heads)]",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "a claimed case an earlier checkpoint already learned is handed out again",
        "store/partitions.py",
        "fresh = [lease for lease, done in zip(claimed, learned, strict=True) if not done]",
        "fresh = list(claimed)",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "a partitioned publish does not refuse a case already learned",
        "store/publish_learned.lua",
        "if redis.call('ZSCORE', learned, ARGV[i]) then return {'learned', ARGV[i]} end",
        "if false then return {'learned', ARGV[i]} end",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "a requeued case stays in `learned`: the next claim finishes it untrained",
        "store/partitions.py",
        "            self.client.zrem(self.keys.learned, *(case.case_id for case in cases))",
        "            pass",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "a partitioned publish does not check its leases first",
        "store/checkpoints.py",
        "            lost = self.queues.heartbeat(leases)\n            if lost:",
        "            lost = self.queues.heartbeat(leases)\n            if False:",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "the published cases are not finished: they wait for the reaper",
        "store/checkpoints.py",
        "            self.queues.ack(leases, blobs)\n",
        "            pass\n",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "a publish refused for a learned case keeps the other cases' leases",
        "store/checkpoints.py",
        "self.queues.release([lease for lease in leases if lease.case_id != case_id], trainer)",
        "pass",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "a heartbeat across partitions does not report a lease it lost",
        "store/partitions.py",
        "            for case_id in self.queues[partition].heartbeat(held)\n",
        "            for case_id in self.queues[partition].heartbeat(held)[:0]\n",
        PARTITIONS,
    ),
    Mutation(
        "partitions",
        "the reaper retries a learned case like any other: at its last attempt it ends dead",
        "store/reap.lua",
        "for i = 4, #ARGV do learned[ARGV[i]] = true end",
        "",
        PARTITIONS,
    ),
    Mutation(
        "reload",
        "a trainer builds on latest as it stands, before the trial its cases ended is settled",
        "workers/processes/trainer.py",
        "        try:\n            self.serving.step()\n",
        "        try:\n            pass\n",
        (
            "tests/test_serving.py::test_a_trainer_builds_on_what_the_live_logic_decided_before_it_trains",
        ),
    ),
    # Hot reload
    Mutation(
        "reload",
        "a refused version in service leaves the worker with no model",
        "workers/processes/reloader.py",
        'service = self._model(state.service, "service") or service',
        'service = self._model(state.service, "service")',
        RELOAD,
    ),
    Mutation(
        "reload",
        "only a publish announcement makes a worker read what serves (a rollback is missed)",
        "workers/processes/reloader.py",
        "        self.sync(step=published)\n        return True",
        "        if published:\n            self.sync(step=True)\n        return True",
        RELOAD,
    ),
    Mutation(
        "reload",
        "a refused version is fetched and refused again on every wake-up",
        "workers/processes/reloader.py",
        "            self.rejected.add(version)\n",
        "",
        RELOAD,
    ),
    Mutation(
        "reload",
        "a canary answers every request, not its share",
        "workers/processes/reloader.py",
        "return canary is not None and takes_canary(request_id, canary.version, self.canary_share)",
        "return canary is not None",
        ("tests/test_serving.py", "tests/test_canary.py"),
    ),
    # Deferring to the engine's rule
    Mutation(
        "serving",
        "a version worse than the engine's rule is never deferred (the sign of the test)",
        "store/serving_step.lua",
        "if rule.z < -canary_z then return defer(service, rule) end",
        "if rule.z > canary_z then return defer(service, rule) end",
        (
            "tests/test_events.py",
            "tests/test_canary.py::test_a_version_worse_than_the_engines_own_rule_defers_to_it",
        ),
    ),
    Mutation(
        "serving",
        "a version in service that defers still gives opinions",
        "workers/processes/reloader.py",
        "return math.inf if self.service_defers and not canary else setting",
        "return setting",
        ("tests/test_signals.py", "tests/test_canary.py"),
    ),
    Mutation(
        "serving",
        "the detector scores no decision against the engine's rule",
        "workers/processes/detector.py",
        "            rule = rule_pnl_pct(trade)\n",
        "            rule = None\n",
        ("tests/test_detector.py::test_each_versions_decisions_add_up_against_the_engines_rule",),
    ),
)
