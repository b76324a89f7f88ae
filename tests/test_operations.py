"""An operator's tools on a real Redis: reading one case, requeueing dead ones, consumers that
leave their groups and idle ones pruned, readiness, and the gauges Prometheus scrapes."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from negcase.cli.cluster_metrics import ClusterCollector
from negcase.client.trades import publish_trades
from negcase.processes.detector import LossDetector
from negcase.runtime.metrics import DetectorMetrics, InferenceMetrics, TrainerMetrics
from negcase.schemas.case import case_id_for
from negcase.store.archive import Archive
from negcase.store.health import HealthKey
from negcase.store.keys import DETECTOR_GROUP
from negcase.store.local_redis import free_port
from negcase.store.queue import CaseQueue
from negcase.store.streams import leave_group
from tests.conftest import ROOT, negcase, run_burst, wait_until
from tests.serving import FEATURES, publish

GRAFANA = ROOT / "workers" / "deploy" / "grafana-dashboard.json"


def loss(trade_id: str, exit_price: float, **extra) -> dict:
    """A BUY at 3000 closed at `exit_price`, with features (so it is queued)."""
    return {
        "trade_id": trade_id,
        "symbol": "ETH/USDT",
        "side": "BUY",
        "entry_price": 3000,
        "exit_price": exit_price,
        "features": FEATURES,
        **extra,
    }


def detect(client, settings, trades: list[dict], archive: Archive | None = None) -> None:
    publish_trades(client, settings.keys, trades, "flat")
    run_burst(LossDetector(client, settings, "detector-1", archive))


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def test_case_shows_one_case_readably_as_json_and_from_the_archive(client, settings):
    # given a 1 % loss, stored and archived
    detect(client, settings, [loss("t1", 2970, model_version=4)], Archive(settings.data_dir))
    # when an operator asks for it by trade_id
    text = negcase(settings, "case", "t1", "--data-dir", str(settings.data_dir))
    # then it reads as the trade, the lesson and where the case stands
    assert text.returncode == 0, text.stderr
    assert f"case {case_id_for('t1')} (trade t1), queued at priority 1" in text.stdout
    assert "Should have SOLD ETH/USDT instead of BUYING" in text.stdout
    assert "ETH/USDT BUY 1 @ 3000 -> 2970" in text.stdout and "v4" in text.stdout
    # and as JSON, numbers as numbers
    data = json.loads(negcase(settings, "case", case_id_for("t1"), "--json").stdout)
    assert data["case"]["trade_id"] == "t1" and data["case"]["training_priority"] == 1
    assert data["state"]["state"] == "queued" and data["state"]["priority"] == 1
    # and once Redis has lost it, from the archive
    client.delete(settings.keys.case(case_id_for("t1")))
    archived = negcase(settings, "case", "t1", "--data-dir", str(settings.data_dir))
    assert archived.returncode == 0 and "stored in " + str(settings.cases_dir) in archived.stdout
    # and an id that names nothing is one clear line
    missing = negcase(settings, "case", "nope")
    assert missing.returncode == 2 and "no case nope" in missing.stderr


def test_requeue_dead_gives_dead_cases_another_go(client, settings):
    # given two cases that failed past the attempt limit
    detect(client, settings, [loss("t1", 2970), loss("t2", 2940)])
    queue = CaseQueue(client, settings.keys, max_attempts=1)
    queue.fail(queue.claim("trainer-a", 2), "CUDA out of memory", "trainer-a")
    assert client.hlen(settings.keys.dead) == 2
    # when one is named that is not dead, nothing happens to it and the command says so
    wrong = negcase(settings, "requeue", "--dead", "nc-nothing")
    assert wrong.returncode == 1 and "nc-nothing: not dead" in wrong.stdout
    # when every dead case is requeued
    result = negcase(settings, "requeue", "--dead")
    # then both are queued again, attempts reset, and the books still balance
    assert result.returncode == 0 and "queued 2 dead case(s)" in result.stdout
    assert client.zcard(settings.keys.queue) == 2 and client.hlen(settings.keys.dead) == 0
    assert client.hlen(settings.keys.attempts) == 0


def test_prune_removes_idle_consumers_that_hold_nothing(client, settings):
    # given two detectors that died: one had acknowledged everything, one holds an entry
    keys = settings.keys
    detect(client, settings, [loss("t1", 2970)])
    publish_trades(client, keys, [loss("t2", 2970), loss("t3", 2970)], "flat")
    for name in ("gone-clean", "gone-holding"):
        [(_, [(entry_id, _)])] = client.xreadgroup(DETECTOR_GROUP, name, {keys.trades: ">"}, 1)
        if name == "gone-clean":
            client.xack(keys.trades, DETECTOR_GROUP, entry_id)
    # then status lists the consumers with what they hold
    status = json.loads(negcase(settings, "status", "--json").stdout)
    held = {c["name"]: c["pending"] for c in status["trades"]["consumer_list"]}
    assert held == {"detector-1": 0, "gone-clean": 0, "gone-holding": 1}
    # when idle consumers are pruned
    wait_until(
        lambda: all(c["idle"] >= 200 for c in client.xinfo_consumers(keys.trades, DETECTOR_GROUP)),
        20,
        "every consumer to be idle for 0.2 s",
    )
    result = negcase(settings, "prune", "--idle-s", "0.2")
    # then only the one that held nothing is gone; the other's entry is not lost
    assert result.returncode == 0, result.stderr
    [kept] = [line for line in result.stdout.splitlines() if "gone-holding" in line]
    assert kept.endswith("kept, deleting it would lose 1 pending entry")
    names = {c["name"].decode() for c in client.xinfo_consumers(keys.trades, DETECTOR_GROUP)}
    assert names == {"gone-holding"}


def test_a_consumer_with_pending_entries_stays_in_its_group(client, settings):
    keys = settings.keys
    publish_trades(client, keys, [loss("t1", 2970)], "flat")
    client.xgroup_create(keys.trades, DETECTOR_GROUP, id="0")
    client.xreadgroup(DETECTOR_GROUP, "holder", {keys.trades: ">"}, 1)
    assert leave_group(client, keys.trades, DETECTOR_GROUP, "holder") == ("pending", 1)
    assert leave_group(client, keys.trades, DETECTOR_GROUP, "nobody") == ("absent", 0)


def test_a_detector_leaves_its_group_when_it_stops_cleanly(client, settings, spawn):
    keys = settings.keys
    detector = spawn("detect", "--consumer", "d1", "--block-ms", "100")

    def consumers() -> set[str]:
        try:
            return {c["name"].decode() for c in client.xinfo_consumers(keys.trades, DETECTOR_GROUP)}
        except Exception:
            return set()

    wait_until(lambda: "d1" in consumers(), what="the detector's first read")
    detector.terminate()
    assert detector.wait(30) == 0
    assert consumers() == set()


def test_an_inference_worker_is_ready_once_it_serves_a_model(client, settings, spawn):
    # given an inference worker started before any checkpoint exists
    port = free_port()
    worker = spawn("serve", "--consumer", "w1", "--block-ms", "100", "--metrics-port", str(port))
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: get(f"{base}/healthz")[0] == 200, what="the worker's /healthz")
    wait_until(
        lambda: negcase(settings, "health", "--kind", "inference").returncode == 0,
        what="the worker's health key",
    )
    # then it is alive but not ready, to the CLI and to /readyz
    not_ready = negcase(settings, "health", "--kind", "inference", "--ready", "--json")
    assert not_ready.returncode == 1
    assert json.loads(not_ready.stdout)["workers"][0]["ready"] is False
    assert get(f"{base}/readyz")[0] == 503
    # when a checkpoint is published, then it becomes ready
    publish(client, settings, seed=1)
    wait_until(lambda: get(f"{base}/readyz")[0] == 200, what="/readyz after the publish")
    wait_until(
        lambda: negcase(settings, "health", "--kind", "inference", "--ready").returncode == 0,
        what="health --ready",
    )
    # and when it stops cleanly it leaves the inference group
    worker.terminate()
    assert worker.wait(30) == 0
    group = settings.keys.requests
    assert client.xinfo_consumers(group, "inference") == []


def test_the_deployment_gauges_say_what_status_says(client, settings):
    keys = settings.keys
    # given cases at priorities 5 and 1 (one of them leased), a win and a loss by v1, a
    # trade one detector holds and one nobody read, v1 published, served by w1
    detect(
        client,
        settings,
        [
            loss("big", 2550, model_version=1),
            loss("small", 2985),
            {**loss("win", 3030), "model_version": 1},
        ],
    )
    CaseQueue(client, keys).claim("trainer-a")
    publish_trades(client, keys, [loss("late-1", 2970), loss("late-2", 2970)], "flat")
    client.xreadgroup(DETECTOR_GROUP, "detector-dead", {keys.trades: ">"}, count=1)
    publish(client, settings, seed=1)
    HealthKey(client, keys, "inference", 30).refresh(consumer="w1", version=1)
    # when Prometheus scrapes
    registry = CollectorRegistry()
    registry.register(ClusterCollector(client, keys))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    # then the gauges hold the queue, the backlog, who serves what and the loss rate
    assert samples[("negcase_queue_cases", (("priority", "1"),))] == 1
    assert samples[("negcase_queue_cases", (("priority", "5"),))] == 0
    assert samples[("negcase_cases", (("state", "leased"),))] == 1
    assert samples[("negcase_cases", (("state", "dead"),))] == 0
    assert samples[("negcase_group_lag", (("group", "detectors"),))] == 1
    assert samples[("negcase_group_pending", (("group", "detectors"),))] == 1
    assert samples[("negcase_group_oldest_pending_seconds", (("group", "detectors"),))] >= 0
    assert samples[("negcase_served_version", (("worker", "w1"),))] == 1
    assert samples[("negcase_latest_checkpoint_version", ())] == 1
    assert samples[("negcase_model_loss_rate", (("version", "1"),))] == 0.5
    assert samples[("negcase_redis_up", ())] == 1
    # and what serves, with the live figures of v1's window: a 15 % loss and a 1 % win
    assert samples[("negcase_serving_version", (("role", "service"),))] == 1
    assert samples[("negcase_serving_version", (("role", "canary"),))] == 0
    assert samples[("negcase_canary_share", ())] == 0
    assert samples[("negcase_service_defers_to_rule", ())] == 0
    assert samples[("negcase_live_outcomes", (("version", "1"),))] == 2
    assert samples[("negcase_live_loss_rate", (("version", "1"),))] == 0.5
    assert samples[("negcase_live_mean_pnl_pct", (("version", "1"),))] == -7.0


def test_the_grafana_dashboard_shows_the_gauges_and_only_metrics_that_exist(client, settings):
    exprs = " ".join(
        target["expr"]
        for panel in json.loads(GRAFANA.read_text())["panels"]
        for target in panel["targets"]
    )
    registry = CollectorRegistry()
    registry.register(ClusterCollector(client, settings.keys))
    served = {family.name for family in registry.collect()}
    for metrics in (DetectorMetrics(), TrainerMetrics(), InferenceMetrics()):
        for family in metrics.registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            served |= {family.name + end for end in suffixes.get(family.type, [""])}
    named = set(re.findall(r"negcase_[a-z_]+", exprs))
    assert named <= served, named - served
    wanted = {
        "negcase_queue_cases",
        "negcase_cases",
        "negcase_group_lag",
        "negcase_group_pending",
        "negcase_group_oldest_pending_seconds",
        "negcase_served_version",
        "negcase_model_loss_rate",
        "negcase_service_defers_to_rule",
    }
    assert wanted <= named, wanted - named


def test_the_dashboard_answers_health_checks_and_serves_the_gauges(client, settings, spawn):
    port = free_port()
    spawn("dashboard", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: get(f"{base}/healthz")[0] == 200, what="the dashboard's /healthz")
    assert get(f"{base}/readyz") == (200, "ready\n")
    status, text = get(f"{base}/metrics")
    assert status == 200 and 'negcase_queue_cases{priority="5"} 0.0' in text


def test_case_reads_the_archive_without_creating_it(client, settings):
    # `negcase case` on a data dir that does not exist must not make one
    negcase(settings, "case", "t1", "--data-dir", str(settings.data_dir))
    assert not Path(settings.data_dir).exists()
