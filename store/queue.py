"""The case queue: a sorted set where the best case to train next has the highest score."""

from __future__ import annotations

# Score layout (higher is claimed first), exact in a double's 53-bit mantissa:
#   priority * 100_000  +  loss in tenths of a percent (capped)  +  an age fraction in [0, 1)
# where older cases get the larger fraction. So `ZREVRANGE queue 0 0` is the next case, and
# a score like 300123.58 reads as "priority 3, loss 12.3 %".
_PRIORITY_UNIT = 100_000
_MAX_LOSS_TENTHS = _PRIORITY_UNIT - 1
_AGE_SPAN_S = 2**32  # seconds since the Unix epoch fit until 2106; resolution about 0.5 s


def queue_score(priority: int, loss_pct: float, created_at_ms: int) -> float:
    """The queue score: priority first, then loss size, then age (older first)."""
    loss_tenths = min(_MAX_LOSS_TENTHS, max(0, int(loss_pct * 10)))
    age_fraction = 1.0 - (created_at_ms / 1000.0) / _AGE_SPAN_S
    return priority * _PRIORITY_UNIT + loss_tenths + age_fraction


def priority_of_score(score: float) -> int:
    """The priority a queue score was built from."""
    return int(score // _PRIORITY_UNIT)


def score_range(priority: int) -> tuple[float, str]:
    """ZCOUNT/ZRANGEBYSCORE bounds (min, exclusive max) of one priority's scores."""
    return priority * _PRIORITY_UNIT, f"({(priority + 1) * _PRIORITY_UNIT}"
