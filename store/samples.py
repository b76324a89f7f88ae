"""The cases a training session draws on besides its own: the held-out set it is measured on,
and the replay sample of earlier cases it rehearses so that it does not forget them."""

from __future__ import annotations

import random

import redis

from negcase.schemas.case import NegativeCase, case_problem
from negcase.store.cases import CaseStore
from negcase.store.keys import Keys
from negcase.store.queue import id_hash, is_held_out

# Replay draws from at most this many done cases are reproducible (see _replay_pool).
SEEDED_DRAW_MAX = 20_000


class HeldOutSet:
    """The held-out cases: those the fixed rule on the id holds out (about `share` of all
    cases, store/queue.py is_held_out), trainable, at most `size` of them (lowest id hashes
    first), the same for every trainer. They are never claimed for training and never
    replayed, so they measure generalization. Re-read when the case count grew by 10 % or
    the set is not full yet."""

    def __init__(
        self, client: redis.Redis, keys: Keys, size: int, feature_count: int, share: float
    ) -> None:
        self.client = client
        self.keys = keys
        self.size = size
        self.feature_count = feature_count
        self.share = share
        self._total = -1
        self._cases: list[NegativeCase] = []

    def cases(self) -> list[NegativeCase]:
        """The held-out cases, refreshed when the case population grew enough."""
        if self.size <= 0 or self.share <= 0:
            return []
        total = int(self.client.scard(self.keys.cases))
        full = len(self._cases) >= self.size
        if total != self._total and (not full or total >= self._total * 1.1):
            ids = (i.decode() for i in self.client.smembers(self.keys.cases))
            held = sorted((i for i in ids if is_held_out(i, self.share)), key=id_hash)
            chosen = CaseStore(self.client, self.keys).get_many(held[: self.size])
            self._cases = [c for c in chosen if case_problem(c, self.feature_count) is None]
            self._total = total
        return self._cases

    def ids(self) -> set[str]:
        """Ids of the current held-out cases."""
        return {case.case_id for case in self._cases}


def sample_replay(
    client: redis.Redis,
    keys: Keys,
    size: int,
    exclude: set[str],
    feature_count: int,
    rng: random.Random,
    heldout_share: float,
) -> list[NegativeCase]:
    """Up to `size` earlier cases, drawn at random with weight = priority, from those done
    that were trained and not refused by the gate: never a held-out case (it would stop
    being held out) nor a rejected one (its update was judged harmful)."""
    if size <= 0:
        return []
    drawn = _replay_pool(client, keys, 3 * size, rng)
    candidates = [i for i in drawn if i not in exclude and not is_held_out(i, heldout_share)]
    if not candidates:
        return []
    refused = client.hmget(keys.rejected, candidates)
    accepted = [i for i, reason in zip(candidates, refused, strict=True) if reason is None]
    cases = CaseStore(client, keys).get_many(accepted)
    usable = [case for case in cases if case_problem(case, feature_count) is None]
    return weighted_sample(usable, size, rng)


def _replay_pool(client: redis.Redis, keys: Keys, count: int, rng: random.Random) -> list[str]:
    """Up to `count` distinct done case ids, at random. Drawn with the trainer's seeded `rng`
    from the sorted ids while there are at most SEEDED_DRAW_MAX, so that one trainer with one
    seed trains the same way twice (the backtest's reproducibility); beyond that, SRANDMEMBER,
    whose randomness no seed reaches, spares reading every id."""
    if client.scard(keys.done) > SEEDED_DRAW_MAX:
        return [i.decode() for i in client.srandmember(keys.done, count) or []]
    done = sorted(i.decode() for i in client.smembers(keys.done))
    return rng.sample(done, min(count, len(done)))


def weighted_sample(cases: list[NegativeCase], size: int, rng: random.Random) -> list[NegativeCase]:
    """Up to `size` cases without replacement, each drawn with weight = its priority
    (Efraimidis-Spirakis: key u^(1/w), the largest keys win)."""
    ranked = sorted(cases, key=lambda c: rng.random() ** (1 / c.training_priority), reverse=True)
    return ranked[:size]
