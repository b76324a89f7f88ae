"""Prometheus gauges of the whole deployment, read from Redis at scrape time: the case queue
by priority and state, each consumer group's lag, pending entries and oldest pending age,
dead letters, the latest checkpoint, the version each inference worker serves, live workers
by kind, the live loss rate per model version, what serves (in service, canary) and each
version's live figures. `negcase dashboard` serves them at
/metrics (one scrape target for what is shared; each worker's own port has its counters)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from negcase.cli.status import gather_status
from negcase.store.keys import Keys

CASE_STATES = ("queued", "leased", "done", "dead", "rejected", "held_out", "total")


class ClusterCollector(Collector):
    """Collects the deployment's gauges with one `gather_status` per scrape."""

    def __init__(self, client: redis.Redis, keys: Keys, partitions: int = 1) -> None:
        self.client = client
        self.keys = keys
        self.partitions = partitions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Every gauge, or only negcase_redis_up 0 while Redis does not answer."""
        up = GaugeMetricFamily("negcase_redis_up", "Whether Redis answered this scrape")
        try:
            status = gather_status(self.client, self.keys, self.partitions)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from case_gauges(status)
        yield from group_gauges(status)
        yield from model_gauges(status)
        yield from live_gauges(status)


def _gauge(name: str, text: str, labels: list[str], rows: dict[Any, float]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, text, labels=labels)
    for label, value in rows.items():
        gauge.add_metric(list(label) if isinstance(label, tuple) else [str(label)], value)
    return gauge


def case_gauges(status: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Queue depth by priority, and cases by state (leased, dead, ...)."""
    cases = status["cases"]
    yield _gauge(
        "negcase_queue_cases",
        "Cases waiting for training, by priority",
        ["priority"],
        cases["queued_by_priority"],
    )
    yield _gauge(
        "negcase_cases",
        "Trainable cases by state (rejected and held_out are part of done)",
        ["state"],
        {state: cases[state] for state in CASE_STATES},
    )
    yield _gauge(
        "negcase_cases_without_features",
        "Losses archived without features",
        [],
        {(): cases["without_features"]},
    )


def group_gauges(status: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Per consumer group (detectors on trades, inference on signal requests)."""
    sections = [status[name] for name in ("trades", "signals")]
    by_group = {s["group"]: s for s in sections}
    yield _gauge(
        "negcase_group_lag",
        "Entries no consumer of the group has read yet",
        ["group"],
        {g: s["lag"] or 0 for g, s in by_group.items()},
    )
    yield _gauge(
        "negcase_group_pending",
        "Entries read but not acknowledged",
        ["group"],
        {g: s["pending"] for g, s in by_group.items()},
    )
    yield _gauge(
        "negcase_group_oldest_pending_seconds",
        "How long the oldest pending entry has waited since delivery (0: none pending)",
        ["group"],
        {g: (s["oldest_pending_idle_ms"] or 0) / 1000 for g, s in by_group.items()},
    )
    yield _gauge(
        "negcase_group_consumers",
        "Consumers in the group, idle ones included",
        ["group"],
        {g: s["consumers"] for g, s in by_group.items()},
    )
    yield _gauge(
        "negcase_dead_letters",
        "Entries in the group's dead-letter stream",
        ["group"],
        {g: s["dead_letters"] for g, s in by_group.items()},
    )


def model_gauges(status: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """The latest checkpoint, who serves what, live workers, loss rate per model version."""
    latest = status["latest_checkpoint"]
    yield _gauge(
        "negcase_latest_checkpoint_version",
        "The version <ns>:ckpt:latest names (0: none yet)",
        [],
        {(): latest or 0},
    )
    served = {
        row["name"]: row["version"]
        for row in status["workers"]
        if row["kind"] == "inference" and row["version"] is not None
    }
    yield _gauge(
        "negcase_served_version",
        "Model version each live inference worker serves",
        ["worker"],
        served,
    )
    yield _gauge(
        "negcase_workers_alive",
        "Workers whose health key is fresh, by kind",
        ["kind"],
        status["workers_alive"],
    )
    models = {v: row for v, row in status["models"].items() if v != "none"}
    yield _gauge(
        "negcase_model_loss_rate",
        "Share of the trades made with a model version that lost",
        ["version"],
        {v: row["loss_rate"] for v, row in models.items()},
    )
    yield _gauge(
        "negcase_model_trades",
        "Closed trades that named the model version",
        ["version"],
        {v: row["trades"] for v, row in models.items()},
    )


def live_gauges(status: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """What serves (in service, the canary and its share) and each version's live figures
    over its window (store/live.py)."""
    live = status["live"]
    trial = live["canary"] or {}
    yield _gauge(
        "negcase_serving_version",
        "The version in service and the canary on trial (0: none)",
        ["role"],
        {"service": live["service"] or 0, "canary": trial.get("version") or 0},
    )
    yield _gauge(
        "negcase_service_defers_to_rule",
        "1 while the version in service defers to the engine's own rule (answers no opinion)",
        [],
        {(): int(live["service_defers"])},
    )
    yield _gauge(
        "negcase_canary_share",
        "Share of signal requests the canary answers (0: no canary)",
        [],
        {(): trial.get("share") or 0},
    )
    versions = live["versions"]
    yield _gauge(
        "negcase_live_outcomes",
        "Outcomes in a version's live window",
        ["version"],
        {v: row["outcomes"] for v, row in versions.items()},
    )
    yield _gauge(
        "negcase_live_loss_rate",
        "Losses per trade over a version's live window",
        ["version"],
        {v: row["loss_rate"] for v, row in versions.items()},
    )
    yield _gauge(
        "negcase_live_mean_pnl_pct",
        "Mean P&L per decision over a version's live window, percent of margin",
        ["version"],
        {v: row["mean_pnl_pct"] for v, row in versions.items()},
    )
