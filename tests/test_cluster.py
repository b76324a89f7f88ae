"""negcase on a real three-primary Redis Cluster: the whole loop through the CLI and the
workers, with a hash-tagged namespace; a clear error without one."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import orjson
import pytest
import redis
from redis.cluster import key_slot

from negcase.cli.main import main
from negcase.client.signal_client import SignalClient, SignalTimeout
from negcase.processes.losses import outcome_of
from negcase.runtime.settings import Settings
from negcase.schemas.case import case_id_for
from negcase.schemas.signal import SignalRequestError
from negcase.schemas.trade import TradeDefaults, TradeError, validate_trade
from negcase.sim.engine import random_trades
from negcase.store.connection import connect
from tests.conftest import negcase, wait_until, worker_env
from tests.topologies import LocalCluster

pytestmark = pytest.mark.slow

FAST_TRAINING = {
    "NEGCASE_EPOCH_MULTIPLIER": "0.05",
    # Every update publishes (no validation window, no minimum of outcomes): this test is
    # about where things are stored, not the gate.
    "NEGCASE_HELDOUT_SHARE": "0",
    "NEGCASE_MIN_OUTCOMES": "0",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three primaries owning a third of the slots each."""
    started = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield started
    started.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[redis.RedisCluster]:
    """A cluster client on emptied nodes."""
    c = connect(cluster.url)
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def settings(client, cluster: LocalCluster, tmp_path: Path) -> Settings:
    """A hash-tagged namespace on the cluster, so every key lands in one slot; a published
    version serves at once (no canary), as in every test but the canary's."""
    return Settings(
        redis_url=cluster.url,
        namespace="{negcase}",
        data_dir=tmp_path / "negative",
        canary_share=0.0,
    )


@dataclass
class Result:
    """What an in-process command returned and printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable:
    """Run an operator command (`negcase status`, ...) in this process, as the CLI would
    with the settings' environment: the same code, without a torch import per command."""

    def run(settings: Settings, *args: str, stdin: str | None = None) -> Result:
        for name, value in worker_env(settings).items():
            if name.startswith("NEGCASE_"):
                monkeypatch.setenv(name, value)
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def losses_among(trades: list[dict]) -> set[str]:
    found = set()
    for trade in trades:
        try:
            valid = validate_trade(trade, TradeDefaults())
        except TradeError:
            continue
        if outcome_of(valid).is_loss:
            found.add(case_id_for(valid.trade_id))
    return found


def served_version(signals: SignalClient) -> int | None:
    try:
        return signals.request([0.1] * 8, timeout_s=1.0).model_version
    except (SignalTimeout, SignalRequestError):  # still starting, or no model yet
        return None


def test_the_whole_loop_runs_on_a_cluster(client, settings: Settings, spawn, command) -> None:
    # given trades published through the CLI onto the cluster
    trades = list(islice(random_trades(5, prefix="c"), 24))
    lines = "\n".join(orjson.dumps(trade).decode() for trade in trades)
    published = command(settings, "publish", "--file", "-", stdin=lines)
    assert published.code == 0, published.err
    expected = losses_among(trades)
    # when a detector drains them, an inference worker runs and a trainer drains the queue
    detect = negcase(settings, "detect", "--burst")
    assert detect.returncode == 0, detect.stderr
    assert {m.decode() for m in client.smembers(settings.keys.cases)} == expected
    spawn("serve", "--consumer", "w1", env=worker_env(settings))
    train = negcase(settings, "train", "--burst", "--consumer", "t1", **FAST_TRAINING)
    assert train.returncode == 0, train.stderr
    latest = int(client.get(settings.keys.latest))
    assert latest >= 2, "a few publishes are needed to roll back"

    # then the inference worker reloads and answers with the latest version
    signals = SignalClient.from_settings(settings)
    wait_until(lambda: served_version(signals) == latest, 60, f"replies from v{latest}")
    # and status counts every case, trained, with the checkpoints
    status = json.loads(command(settings, "status", "--json").out)
    cases = status["cases"]
    assert cases["total"] == len(expected) and cases["queued"] == 0 and cases["leased"] == 0
    assert status["latest_checkpoint"] == latest
    assert status["trades"]["pending"] == 0
    # and tail shows what happened
    tail = command(settings, "tail", "--last", "1000", "--count", "3", "--json")
    assert tail.code == 0 and len(tail.out.splitlines()) == 3
    shown = command(
        settings, "tail", "--last", "500", "--count", "1", "--type", "checkpoint_loaded"
    )
    assert "w1" in shown.out, shown.out
    # and a rollback moves the inference worker back
    listing = command(settings, "checkpoints")
    starred = [line.split() for line in listing.out.splitlines() if line.startswith("*")]
    assert starred and starred[0][1] == str(latest), listing.out
    rollback = command(settings, "rollback", "1")
    assert rollback.code == 0, rollback.err
    wait_until(lambda: served_version(signals) == 1, 60, "replies from v1 after the rollback")

    # and every key negcase wrote sits in the one slot of its hash tag
    written = list(client.scan_iter(match="{negcase}:*"))
    assert len(written) > 10
    assert {key_slot(key) for key in written} == {key_slot(b"{negcase}")}


def test_an_untagged_namespace_is_refused_with_the_slot_problem_named(
    cluster, settings, command
) -> None:
    # given the cluster and the default namespace, which has no hash tag
    untagged = Settings(redis_url=cluster.url, namespace="negcase", data_dir=settings.data_dir)
    # when a worker or a command starts there
    worker = negcase(untagged, "detect", "--burst")
    status = command(untagged, "status")
    # then each stops at once, naming the slots and the fix
    for code, err in ((worker.returncode, worker.stderr), (status.code, status.err)):
        assert code != 0
        assert "slots of the Redis Cluster" in err and "NEGCASE_NAMESPACE={negcase}" in err
    # and an engine's client says the same
    with pytest.raises(ValueError, match="hash tag"):
        SignalClient.from_settings(untagged)


def test_the_whole_loop_runs_on_three_partitions_each_in_its_own_slot(
    client, settings: Settings, spawn, command
) -> None:
    # given three partitions of the tagged namespace, and trades of several symbols
    # published through the CLI (each to its symbol's partition)
    parted = settings.with_overrides(partitions=3)
    trades = list(islice(random_trades(6, prefix="p"), 36))
    lines = "\n".join(orjson.dumps(trade).decode() for trade in trades)
    published = command(parted, "publish", "--file", "-", stdin=lines)
    assert published.code == 0, published.err
    expected = losses_among(trades)
    # when one detector drains every partition, an inference worker runs and a trainer
    # drains the queues
    detect = negcase(parted, "detect", "--burst")
    assert detect.returncode == 0, detect.stderr
    parts = parted.partition_keys
    stored = [{m.decode() for m in client.smembers(part.cases)} for part in parts]
    assert set().union(*stored) == expected
    assert sum(len(cases) for cases in stored) == len(expected)
    assert sum(1 for cases in stored if cases) >= 2, "the symbols should spread the cases"
    spawn("serve", "--consumer", "w1", env=worker_env(parted))
    train = negcase(parted, "train", "--burst", "--consumer", "t1", **FAST_TRAINING)
    assert train.returncode == 0, train.stderr
    latest = int(client.get(parted.keys.latest))
    assert latest >= 2, "a few publishes are needed to roll back"

    # then the inference worker reloads and answers with the latest version
    signals = SignalClient.from_settings(parted)
    wait_until(lambda: served_version(signals) == latest, 60, f"replies from v{latest}")
    # and status sums every partition and breaks the figures down by partition
    status = json.loads(command(parted, "status", "--json").out)
    cases = status["cases"]
    assert cases["total"] == len(expected) and cases["queued"] == 0 and cases["leased"] == 0
    assert cases["conserved"] and status["trades"]["pending"] == 0
    assert status["trades"]["stream_length"] == len(trades)
    breakdown = status["partitions"]
    assert [p["namespace"] for p in breakdown] == [k.namespace for k in parts]
    assert [p["cases"]["total"] for p in breakdown] == [len(cases) for cases in stored]
    assert status["latest_checkpoint"] == latest
    text = command(parted, "status")
    assert "{negcase:p2}" in text.out, text.out
    # and tail shows the partitions' events beside the namespace's
    events = sum(client.xlen(k.events) for k in [parted.keys, *parts])
    tail = command(parted, "tail", "--last", "1000", "--count", str(min(1000, events)), "--json")
    types = {json.loads(line)["type"] for line in tail.out.splitlines()}
    assert {"case_added", "checkpoint_published", "checkpoint_loaded"} <= types, types
    # and a rollback moves the inference worker back
    rollback = command(parted, "rollback", "1")
    assert rollback.code == 0, rollback.err
    wait_until(lambda: served_version(signals) == 1, 60, "replies from v1 after the rollback")

    # and each partition's keys sit in one slot of their own, apart from the lineage's
    slot_of = {
        ns: client.cluster_keyslot(f"{ns}:x") for ns in ["{negcase}", *(k.namespace for k in parts)]
    }
    assert len(set(slot_of.values())) == 4
    for ns, slot in slot_of.items():
        written = list(client.scan_iter(match=f"{ns}:*"))
        assert written, ns
        assert {client.cluster_keyslot(key) for key in written} == {slot}, ns
