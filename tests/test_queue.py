"""The case queue on a real Redis: claim order, leases with fencing tokens, heartbeats, ack,
failure and the dead set, the reaper, requeueing, and conservation after each story."""

from __future__ import annotations

import pytest
import redis

from negcase.runtime.settings import Settings
from negcase.store.leases import LeaseLost
from negcase.store.queue import HELD_OUT_STAT, CaseQueue, is_held_out
from tests.training_cases import add_cases, assert_conserved, make_case, wait_for_lapse


def queue_for(
    client: redis.Redis, settings: Settings, lease_s: float = 30.0, heldout_share: float = 0.0
) -> CaseQueue:
    return CaseQueue(
        client, settings.keys, lease_s=lease_s, max_attempts=3, heldout_share=heldout_share
    )


def test_claims_by_priority_then_loss_then_age(client, settings) -> None:
    hour_ms = 3_600_000
    add_cases(
        client,
        settings,
        [
            make_case(1, [0.0] * 8, priority=2, loss_pct=1.5),
            make_case(2, [0.0] * 8, priority=5, loss_pct=11.0, created_at_ms=2 * hour_ms),
            make_case(3, [0.0] * 8, priority=5, loss_pct=30.0, created_at_ms=2 * hour_ms),
            make_case(4, [0.0] * 8, priority=5, loss_pct=11.0, created_at_ms=hour_ms),  # older
            make_case(5, [0.0] * 8, priority=3, loss_pct=4.0),
        ],
    )
    queue = queue_for(client, settings)

    order = [lease.case_id[-1] for lease in queue.claim("t1", count=5)]

    assert order == ["3", "4", "2", "5", "1"]
    assert assert_conserved(client, settings)["leased"] == 5


def test_each_claim_gets_a_new_fencing_token_and_a_redis_time_deadline(client, settings) -> None:
    add_cases(client, settings, [make_case(n, [0.0] * 8) for n in range(2)])
    queue = queue_for(client, settings, lease_s=30)
    redis_now_ms = client.time()[0] * 1000

    first, second = queue.claim("t1"), queue.claim("t2")

    assert second[0].token > first[0].token
    assert 25_000 < first[0].deadline_ms - redis_now_ms < 35_000
    assert queue.claim("t3") == []


def test_ack_moves_cases_to_done_and_stores_their_new_blob(client, settings) -> None:
    case = make_case(1, [0.0] * 8)
    add_cases(client, settings, [case])
    queue = queue_for(client, settings)
    [lease] = queue.claim("t1")

    queue.ack([lease], {case.case_id: b"new blob"}, rejected_reason="held-out loss rose")

    assert client.get(settings.keys.case(case.case_id)) == b"new blob"
    assert client.hget(settings.keys.rejected, case.case_id) == b"held-out loss rose"
    counts = assert_conserved(client, settings)
    assert (counts["done"], counts["leased"], counts["rejected"]) == (1, 0, 1)


def test_an_expired_lease_cannot_heartbeat_or_ack_even_before_the_reaper(client, settings) -> None:
    add_cases(client, settings, [make_case(1, [0.0] * 8)])
    queue = queue_for(client, settings, lease_s=0.2)
    [lease] = queue.claim("t1")
    wait_for_lapse(client, lease.deadline_ms)

    assert queue.heartbeat([lease]) == [lease.case_id]
    assert client.zscore(settings.keys.leased, lease.case_id) == lease.deadline_ms  # not moved
    with pytest.raises(LeaseLost):
        queue.ack([lease])
    assert assert_conserved(client, settings)["leased"] == 1


def test_heartbeats_keep_a_lease_alive_past_its_first_deadline(client, settings) -> None:
    # given a case leased for 1 s, and a heartbeat that extends its lease to 60 s
    add_cases(client, settings, [make_case(1, [0.0] * 8)])
    short, long = queue_for(client, settings, lease_s=1.0), queue_for(client, settings, lease_s=60)
    for _ in range(5):  # a stall of over 1 s between claim and heartbeat loses it: claim again
        [lease] = short.claim("t1")
        if long.heartbeat([lease]) == []:
            break
        short.release([lease], "t1")
    # when the first deadline has passed
    wait_for_lapse(client, lease.deadline_ms)

    # then the lease still holds: the reaper leaves it, heartbeats and the ack go through
    assert client.zscore(settings.keys.leased, lease.case_id) >= lease.deadline_ms + 59_000
    assert long.reap() == 0
    assert long.heartbeat([lease]) == []
    long.ack([lease])
    assert assert_conserved(client, settings)["done"] == 1


def test_reaper_returns_expired_leases_and_the_old_token_is_fenced(client, settings) -> None:
    add_cases(client, settings, [make_case(1, [0.0] * 8)])
    queue = queue_for(client, settings, lease_s=0.2)
    [stale] = queue.claim("t1")
    wait_for_lapse(client, stale.deadline_ms)
    assert queue.reap() == 1
    fresh_queue = queue_for(client, settings, lease_s=60)
    [fresh] = fresh_queue.claim("t2")

    assert fresh.case_id == stale.case_id and fresh.attempts == 1
    # the old holder can neither extend, fail, release nor ack the new holder's lease
    assert queue.heartbeat([stale]) == [stale.case_id]
    assert client.zscore(settings.keys.leased, fresh.case_id) == fresh.deadline_ms
    assert queue.fail([stale], "late", "t1") == {stale.case_id: "fenced"}
    assert queue.release([stale], "t1") == {stale.case_id: "fenced"}
    with pytest.raises(LeaseLost):
        queue.ack([stale])
    [expired] = [
        f for _, f in client.xrange(settings.keys.events) if f[b"type"] == b"lease_expired"
    ]
    assert (expired[b"worker"], expired[b"attempts"]) == (b"t1", b"1")
    assert assert_conserved(client, settings)["leased"] == 1
    # and the new holder still can
    assert fresh_queue.heartbeat([fresh]) == []
    fresh_queue.ack([fresh])
    assert assert_conserved(client, settings)["done"] == 1


def test_the_reaper_sends_a_case_dead_when_its_last_attempt_expires(client, settings) -> None:
    # given a case whose leases keep expiring, with two attempts allowed
    add_cases(client, settings, [make_case(1, [0.0] * 8), make_case(2, [0.0] * 8, priority=1)])
    queue = CaseQueue(client, settings.keys, lease_s=0.2, max_attempts=2)
    reaped = []
    for worker in ("t1", "t2"):
        [lease] = queue.claim(worker)
        assert lease.case_id == "nc-test-00001"
        wait_for_lapse(client, lease.deadline_ms)
        # when the reaper finds each expired
        assert queue.reap() == 1
        reaped.append(assert_conserved(client, settings))

    # then the first went back to the queue, the last to the dead set, with who held it
    assert [(c["queued"], c["dead"]) for c in reaped] == [(2, 0), (1, 1)]
    assert client.hget(settings.keys.dead, "nc-test-00001") == b"lease expired (held by t2)"
    dead = [f for _, f in client.xrange(settings.keys.events) if f[b"type"] == b"case_dead"]
    assert [(f[b"case_id"], f[b"attempts"]) for f in dead] == [(b"nc-test-00001", b"2")]
    # and it is never claimed again, while the other case flows
    assert [lease.case_id for lease in queue.claim("t3", count=2)] == ["nc-test-00002"]


def test_a_case_that_keeps_failing_goes_dead_with_its_last_error(client, settings) -> None:
    add_cases(client, settings, [make_case(1, [0.0] * 8), make_case(2, [0.0] * 8, priority=1)])
    queue = queue_for(client, settings)
    outcomes = []
    for attempt in range(3):
        [lease] = queue.claim("t1")
        assert lease.case_id == "nc-test-00001"
        outcomes.append(queue.fail([lease], f"boom {attempt}", "t1")[lease.case_id])

    assert outcomes == ["queued", "queued", "dead"]
    assert client.hget(settings.keys.dead, "nc-test-00001") == b"boom 2"
    assert [lease.case_id for lease in queue.claim("t1")] == ["nc-test-00002"]  # others flow
    assert assert_conserved(client, settings)["dead"] == 1


def test_release_hands_a_case_back_without_counting_an_attempt(client, settings) -> None:
    add_cases(client, settings, [make_case(1, [0.0] * 8)])
    queue = queue_for(client, settings)
    [lease] = queue.claim("t1")

    assert queue.release([lease], "t1") == {lease.case_id: "queued"}
    assert queue.claim("t2")[0].attempts == 0


def test_requeue_brings_back_done_and_dead_cases_but_not_leased_ones(client, settings) -> None:
    cases = [make_case(n, [0.0] * 8, priority=5 - n) for n in range(3)]
    add_cases(client, settings, cases)
    queue = queue_for(client, settings)
    done, dead, held = queue.claim("t1", count=3)
    queue.ack([done])
    client.hset(settings.keys.attempts, dead.case_id, 2)
    queue.fail([dead], "boom", "t1")

    assert queue.requeue(cases) == 2
    counts = assert_conserved(client, settings)
    assert (counts["queued"], counts["leased"], counts["done"], counts["dead"]) == (2, 1, 0, 0)
    assert held.case_id in {m.decode() for m in client.zrange(settings.keys.leased, 0, -1)}


def test_requeue_restores_cases_into_an_empty_redis(client, settings) -> None:
    cases = [make_case(n, [0.0] * 8) for n in range(3)]
    queue = queue_for(client, settings)

    assert queue.requeue(cases, restore=True) == 3
    assert assert_conserved(client, settings)["queued"] == 3
    assert client.exists(*(settings.keys.case(case.case_id) for case in cases)) == 3


def test_held_out_cases_are_never_leased_they_go_to_done_untrained(client, settings) -> None:
    # given 200 cases, oldest (best) first, and a rule holding out about a tenth of them by id
    cases = [
        make_case(n, [0.0] * 8, created_at_ms=1_700_000_000_000 + n * 10_000) for n in range(200)
    ]
    held_out = {case.case_id for case in cases if is_held_out(case.case_id, 0.1)}
    assert 5 < len(held_out) < 40 and "nc-test-00004" in held_out
    add_cases(client, settings, cases)
    queue = queue_for(client, settings, heldout_share=0.1)

    # when trainers claim, one case at a time and then in batches
    [first] = queue.claim("t1")
    leases = [first, *queue.claim("t1", count=150), *queue.claim("t1", count=150)]

    # then every case that is not held out was leased once, in order, none that is held out;
    # Redis (claim.lua, redis.sha1hex) and Python (is_held_out) agree on every id
    assert first.case_id == "nc-test-00000"
    assert [lease.case_id for lease in leases] == [
        case.case_id for case in cases if case.case_id not in held_out
    ]
    done = {member.decode() for member in client.smembers(settings.keys.done)}
    assert done == held_out
    counts = assert_conserved(client, settings)
    assert (counts["queued"], counts["done"], counts["rejected"]) == (0, len(held_out), 0)
    assert counts["held_out"] == len(held_out)
    assert int(client.hget(settings.keys.stats, HELD_OUT_STAT)) == len(held_out)


def test_retrain_all_leaves_done_held_out_cases_done(client, settings) -> None:
    cases = [make_case(n, [0.0] * 8) for n in range(3, 6)]  # nc-test-00004 is held out
    add_cases(client, settings, cases)
    queue = queue_for(client, settings, heldout_share=0.1)
    queue.ack(queue.claim("t1", count=3))

    assert queue.requeue(cases) == 2
    counts = assert_conserved(client, settings)
    assert (counts["queued"], counts["done"], counts["held_out"]) == (2, 1, 1)
    assert client.sismember(settings.keys.done, "nc-test-00004")
