"""The backtest's verdict on the held-out part: one row per policy, the figures that say how
often it lost and what it earned, the difference in loss rate against the control rule with
a bootstrap 95 % interval, and the table people read.

How to read an interval: resampling the held-out decisions (in blocks of neighbours, since
calm and turbulent stretches cluster) 2,000 times, 95 % of the differences fell inside it.
An interval that holds 0 means the held-out part cannot tell the row from the control rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# The rows, in table order.
CONTROL = "control rule"
FIRST = "first checkpoint"
LATEST = "latest checkpoint"
SERVED = "served policy"
OFFLINE = "offline model"
ALWAYS_BUY = "always BUY"

BOOTSTRAP_RESAMPLES = 2000
# An interval needs most resamples to hold trades of both policies.
MIN_USABLE_RESAMPLES = BOOTSTRAP_RESAMPLES // 2


@dataclass(frozen=True, slots=True)
class Outcomes:
    """What one policy did at each held-out decision: the side it took, and that trade's
    result in percent of the margin (NaN for HOLD: no trade)."""

    name: str
    version: int | None
    sides: tuple[str, ...]
    pnl_pct: np.ndarray

    @property
    def traded(self) -> np.ndarray:
        """Per decision: whether a trade was made."""
        return ~np.isnan(self.pnl_pct)

    @property
    def lost(self) -> np.ndarray:
        """Per decision: whether a trade was made and lost (the detector's rule: pnl < 0)."""
        return np.nan_to_num(self.pnl_pct, nan=0.0) < 0


def block_resamples(n: int, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """(resamples, n) decision indices of a circular block bootstrap with blocks of about
    n ** (1/3) neighbouring decisions; the same for every row of one run."""
    block = max(1, round(n ** (1 / 3)))
    starts = np.random.default_rng(seed).integers(0, n, size=(resamples, math.ceil(n / block)))
    indices = (starts[:, :, None] + np.arange(block)) % n
    return indices.reshape(resamples, -1)[:, :n]


def loss_rates(outcomes: Outcomes, indices: np.ndarray) -> np.ndarray:
    """The loss rate in each resample (NaN where it made no trade)."""
    trades = outcomes.traded[indices].sum(axis=1)
    losses = outcomes.lost[indices].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return losses / trades


def difference_interval(
    row: Outcomes, control: Outcomes, indices: np.ndarray
) -> tuple[float, float] | None:
    """The bootstrap 95 % interval of row's loss rate minus the control's, paired on the
    same resampled decisions; None when too few resamples hold trades of both."""
    differences = loss_rates(row, indices) - loss_rates(control, indices)
    differences = differences[np.isfinite(differences)]
    if len(differences) < MIN_USABLE_RESAMPLES:
        return None
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def row_figures(row: Outcomes, control: Outcomes, indices: np.ndarray) -> dict[str, Any]:
    """One row of the table, as plain data (the --json output)."""
    decisions = len(row.sides)
    trades = int(row.traded.sum())
    losses = int(row.lost.sum())
    rate = losses / trades if trades else None
    control_rate = _loss_rate(control)
    difference = None if rate is None or control_rate is None else rate - control_rate
    judged = row is not control and decisions == len(control.sides)
    interval = difference_interval(row, control, indices) if judged else None
    pnl = row.pnl_pct[row.traded]
    return {
        "policy": row.name,
        "version": row.version,
        "decisions": decisions,
        "trades": trades,
        "losses": losses,
        "loss_rate": _rounded(rate),
        "loss_rate_se": _rounded(
            math.sqrt(rate * (1 - rate) / trades) if rate is not None else None
        ),
        "mean_pnl_pct": _rounded(float(pnl.mean()) if trades else None),
        "total_pnl_pct": _rounded(float(pnl.sum()) if decisions else None),
        "hold_share": _rounded(row.sides.count("HOLD") / decisions if decisions else None),
        "loss_rate_vs_control": _rounded(difference),
        "loss_rate_vs_control_95": None if interval is None else [_rounded(v) for v in interval],
    }


def latest_against(outcomes: list[Outcomes], indices: np.ndarray) -> dict[str, Any]:
    """The latest checkpoint's loss rate minus the first checkpoint's and the offline
    model's, each with its paired 95 % interval: whether learning moved past its start, and
    whether it matches an offline model of every train bar."""
    by_name = {row.name: row for row in outcomes}
    latest = by_name[LATEST]
    return {name: _paired(latest, by_name[name], indices) for name in (FIRST, OFFLINE)}


def _paired(row: Outcomes, other: Outcomes, indices: np.ndarray) -> dict[str, Any] | None:
    """Row's loss rate minus other's, with its interval; None where either made no trade."""
    rates = (_loss_rate(row), _loss_rate(other))
    if rates[0] is None or rates[1] is None or len(row.sides) != len(other.sides):
        return None
    interval = difference_interval(row, other, indices)
    return {
        "difference": _rounded(rates[0] - rates[1]),
        "interval_95": None if interval is None else [_rounded(v) for v in interval],
    }


def _loss_rate(outcomes: Outcomes) -> float | None:
    trades = int(outcomes.traded.sum())
    return int(outcomes.lost.sum()) / trades if trades else None


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def verdict_line(rows: list[dict[str, Any]]) -> str:
    """One sentence: the latest checkpoint against the control rule, the served policy, and
    the offline model."""
    by_name = {row["policy"]: row for row in rows}
    latest, offline = by_name.get(LATEST), by_name.get(OFFLINE)
    served = by_name.get(SERVED)
    if latest is None or latest["version"] is None:
        judged = "no checkpoint was published, so nothing learned can be judged"
    else:
        judged = f"the latest checkpoint (v{latest['version']}) {_against_control(latest)}"
        if served is not None:
            judged += f"; the served policy {_against_control(served)}"
    if offline is not None:
        judged += f"; the offline model {_against_control(offline)}"
    return judged + "."


def _against_control(row: dict[str, Any]) -> str:
    interval = row["loss_rate_vs_control_95"]
    if interval is None:
        return "made too few trades to compare with the control rule"
    figures = (
        f"({_points(row['loss_rate_vs_control'])} points, 95 % interval "
        f"{_points(interval[0])} to {_points(interval[1])})"
    )
    if interval[0] > 0:
        return f"loses more often than the control rule {figures}"
    if interval[1] < 0:
        return f"loses less often than the control rule {figures}"
    return f"is within the noise of the control rule {figures}"


def _points(share: float) -> str:
    return f"{share * 100:+.1f}"


def difference_text(share: float, interval: list[float] | None, unit: str = "") -> str:
    """A difference of loss rates in points, then `unit`, then its interval when there is
    one: "+0.5 points [-6.6, +8.0]"."""
    text = _points(share) + unit
    if interval is not None:
        text += f" [{_points(interval[0])}, {_points(interval[1])}]"
    return text


def render_table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as aligned text lines, with a header."""
    lines = [
        f"{'policy':<24} {'trades':>6}  {'loss rate':<14} {'mean pnl %':>10} {'total pnl %':>11}"
        f" {'HOLD':>6}  loss rate vs control [95 % interval]"
    ]
    for row in rows:
        name = row["policy"] + (f" v{row['version']}" if row["version"] is not None else "")
        if not row["decisions"]:
            lines.append(f"{name:<24} (none was published)")
            continue
        lines.append(
            f"{name:<24} {row['trades']:>6}  {_rate_text(row):<14} "
            f"{_signed(row['mean_pnl_pct']):>10} {_signed(row['total_pnl_pct'], 1):>11} "
            f"{_share(row['hold_share']):>6}  {_difference_text(row)}"
        )
    return lines


def _rate_text(row: dict[str, Any]) -> str:
    if row["loss_rate"] is None:
        return "n/a"
    return f"{row['loss_rate'] * 100:.1f} % ± {row['loss_rate_se'] * 100:.1f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f} %"


def _difference_text(row: dict[str, Any]) -> str:
    if row["policy"] == CONTROL:
        return "(the reference)"
    interval = row["loss_rate_vs_control_95"]
    if row["loss_rate_vs_control"] is None or interval is None:
        return "n/a"
    return difference_text(row["loss_rate_vs_control"], interval, " points")


def render_report(report: dict[str, Any]) -> str:
    """The whole report for people: what was run, the table, and the lines under it."""
    market, options, held = report["market"], report["options"], report["held_out"]
    train, cases, training = report["train_part"], report["cases"], report["training"]
    lines = [
        f"negcase backtest: {market['symbol']}, {market['bars']} bars from {market['from']} to "
        f"{market['to']} ({market['file']})",
        f"  decide every {options['every']} bars, hold {options['hold']}, leverage "
        f"{options['leverage']:g}, fee {options['fee_rate'] * 100:g} % of notional, seed "
        f"{options['seed']}, {options['trainers']} trainer(s), {market['features']} features "
        f"({market['feature_count']}); control rule: {options['control_rule']}",
        f"  train part {train['from']} to {train['to']}: {train['decisions']} decisions, "
        f"{train['trades']} trades published, {train['by_control']} decided by the control "
        "rule (no checkpoint yet)",
        "",
        f"held-out part, {held['from']} to {held['to']}: {held['decisions']} decisions, "
        "each policy judged on the same bars",
        *render_table(held["rows"]),
        "",
        "cases     "
        + _counts(cases["by_priority"], "P")
        + "  |  by label "
        + _counts(cases["by_label"])
        + f"  ({cases['total']} in all)",
        "training  "
        + (_counts(training["sessions"]) or "no sessions")
        + f"; {training['checkpoints_published']} checkpoints published; serving "
        + (_counts(training.get("serving_changes") or {}) or "n/a"),
        *_served_lines(report.get("served"), options.get("canary")),
        "train part, loss rate of the model's live trades by quarter, beside the control rule "
        "on the same bars:",
        *(_quarter_line(quarter) for quarter in train["quarters"]),
        *_latest_lines(held.get("latest_against")),
        "verdict   " + report["verdict"],
    ]
    return "\n".join(lines)


def _latest_lines(compared: dict[str, Any] | None) -> list[str]:
    """The latest checkpoint against the first and the offline model, paired."""
    if not compared:
        return []
    parts = []
    for name, figures in compared.items():
        if figures is None:
            parts.append(f"{name} n/a")
            continue
        parts.append(
            f"{name} {difference_text(figures['difference'], figures['interval_95'], ' points')}"
        )
    return ["latest    loss rate against the " + ", against the ".join(parts)]


def _served_lines(served: dict[str, Any] | None, canary: dict[str, Any] | None) -> list[str]:
    """What the live logic did over the held-out part, for the served policy's row."""
    if not served or not canary:
        return []
    changes = ", ".join(
        f"{c['change']} v{c['version']} before {c['before']}" for c in served["changes"]
    )
    return [
        f"served    canary on {canary['share'] * 100:g} % of decisions, judged after "
        f"{canary['min_outcomes']} outcomes; in service {_v(served['in_service_first'])} at "
        f"the held-out start, {_v(served['in_service_last'])} at its end; "
        + (f"changes: {changes}" if changes else "no change")
        + "; answered by "
        + _counts(served["answered_by"]),
    ]


def _v(version: int | None) -> str:
    return "none" if version is None else f"v{version}"


def _counts(counts: dict[str, int], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{name} {count}" for name, count in counts.items())


def _quarter_line(quarter: dict[str, Any]) -> str:
    def rate(value: float | None, trades: int) -> str:
        return "n/a" if value is None else f"{value * 100:.1f} % of {trades} trades"

    return (
        f"  {quarter['from']} to {quarter['to']}:  model "
        f"{rate(quarter['model_loss_rate'], quarter['model_trades'])},  control "
        f"{rate(quarter['control_loss_rate'], quarter['control_trades'])}  "
        f"({quarter['by_control']} of {quarter['decisions']} decisions by the control rule)"
    )
