"""`negcase demo`: the whole loop on one machine, from a local Redis to a summary.

One detector, two trainers and one inference worker run as real processes. A synthetic
trading engine asks the inference worker for a signal before each trade, trades on a
simulated market whose hidden rule can be learnt, and puts the model_version on every
trade-close event, so the loss rate of each model is measured on the trades it made.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis

from negcase.cli.options import (
    CommandError,
    archive_options,
    connection_options,
    logging_options,
    settings_from,
)
from negcase.cli.status import gather_status
from negcase.client.trades import publish_trades
from negcase.runtime.settings import Settings, variable_of
from negcase.runtime.shutdown import interrupt_on_sigterm
from negcase.schemas.case import ACTIONS
from negcase.sim.bench_support import drop_namespace
from negcase.sim.supervisor import Supervisor
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import connect, redacted
from negcase.store.keys import Keys
from negcase.store.local_redis import LocalRedis

if TYPE_CHECKING:
    from negcase.client.signal_client import SignalClient
    from negcase.sim.engine import Situation, SyntheticEngine

TICK_S = 0.25
SERVING_CHANGES = ("canary_started", "promoted", "retired", "rollback")
HELD_OUT_PER_REGIME = 400
# A model's live loss rate is shown once it has made this many trades.
MIN_TRADES_FOR_RATE = 20
# The first checkpoint: the trainers' warm start, once NEGCASE_MIN_OUTCOMES decisions exist.
FIRST_VERSION = 1
# The demo's own namespace: its synthetic trades, cases and models never mix with real ones.
DEMO_NAMESPACE = "negcase-demo"
# A canary answers a quarter of the engine's requests and is judged after 50 outcomes: at
# the demo's 40 trades a second, a trial takes seconds, not the minute the defaults take.
DEMO_CANARY = {"canary_share": 0.25, "canary_min_outcomes": 50, "live_window": 200}
# Keys that only exist once negcase has worked in a namespace.
_USED_KEYS = (
    "trades",
    "cases",
    "queue",
    "events",
    "stats",
    "latest",
    "version_counter",
    "checkpoints",
    "requests",
    "sessions",
    "workers",
)

log = logging.getLogger("negcase.demo")


@contextlib.contextmanager
def demo_redis(settings: Settings) -> Iterator[Settings]:
    """The configured Redis, or a local redis-server started for the demo and stopped after."""
    if settings.redis_url:
        yield settings
        return
    folder = Path(tempfile.mkdtemp(prefix="negcase-demo-redis-"))
    server = LocalRedis(folder).start()
    try:
        yield settings.with_overrides(redis_url=server.url)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def claim_namespace(client: redis.Redis, keys: Keys, partitions: int = 1) -> bool:
    """Make the namespace the demo's: refuse one that holds data the demo did not write,
    clear what an earlier demo left (its counts would mix with this run's), then mark it.
    Returns whether an earlier demo's data was cleared."""
    spaces = keys.with_partitions(partitions)
    used = [name for name in _USED_KEYS if any(client.exists(getattr(k, name)) for k in spaces)]
    earlier_demo = bool(client.exists(keys.demo))
    if used and not earlier_demo:
        raise CommandError(
            f"namespace {keys.namespace!r} holds data no demo wrote ({', '.join(used)}, ...): "
            "the demo never runs on someone else's data; give it an empty one with --namespace"
        )
    if earlier_demo:
        for one in spaces:
            drop_namespace(client, one.namespace)
    mark = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at_ms": int(time.time() * 1000),
    }
    client.set(keys.demo, orjson.dumps(mark))
    return earlier_demo


@dataclass
class EventTally:
    """Counts of what happened, read incrementally from `<ns>:events` (and, with partitions,
    from each partition's, where detectors announce their cases)."""

    keys: Keys
    partitions: int = 1
    cursors: dict[str, bytes | str] = field(default_factory=dict)
    types: Counter[str] = field(default_factory=Counter)
    cases_by_priority: Counter[str] = field(default_factory=Counter)
    cases_by_label: Counter[str] = field(default_factory=Counter)
    sessions: Counter[str] = field(default_factory=Counter)
    loaded_versions: list[int] = field(default_factory=list)
    serving: Counter[str] = field(default_factory=Counter)

    def update(self, client: redis.Redis) -> None:
        """Read every event since the last update."""
        for stream in (one.events for one in self.keys.with_partitions(self.partitions)):
            while reply := client.xread({stream: self.cursors.get(stream, "0-0")}, count=5000):
                for entry_id, fields in reply[0][1]:
                    self.cursors[stream] = entry_id
                    self._count(fields)

    def _count(self, fields: dict[bytes, bytes]) -> None:
        kind = fields.get(b"type", b"").decode()
        self.types[kind] += 1
        if kind == "case_added":
            self.cases_by_priority[fields.get(b"priority", b"?").decode()] += 1
            self.cases_by_label[fields.get(b"should_have", b"?").decode()] += 1
        elif kind == "training_completed":
            self.sessions[fields.get(b"outcome", b"?").decode()] += 1
        elif kind == "checkpoint_loaded":
            self.loaded_versions.append(int(fields[b"version"]))
        elif kind in SERVING_CHANGES:
            self.serving[kind] += 1


@dataclass
class TradingEngine:
    """The demo's trading engine: a signal before each decision, then its trade-close event
    (a skip is reported too, as side HOLD with the market's move). Its own rule, used while
    there is no checkpoint or the model has no opinion, is a three-sided die: BUY, SELL or
    stay out."""

    client: redis.Redis
    settings: Settings
    engine: SyntheticEngine
    signals: SignalClient
    trades: int = 0
    holds: int = 0
    by_own_rule: int = 0
    failed_signals: int = 0

    def trade(self, count: int) -> None:
        """Decide `count` times and publish every decision's event in one pipeline."""
        closed = []
        for _ in range(count):
            situation = self.engine.market.situation()
            decision = self._decide(situation)
            if decision is None:
                continue
            side, version = decision
            closed.append(self.engine.closed_trade(situation, side, version))
        self.trades += publish_trades(
            self.client, self.settings.keys, closed, partitions=self.settings.partitions
        )

    def _decide(self, situation: Situation) -> tuple[str, int | None] | None:
        from negcase.client.signal_client import SignalTimeout
        from negcase.schemas.signal import SignalRequestError

        try:
            signal = self.signals.request(situation.features, timeout_s=5.0)
        except SignalRequestError as error:
            if error.field != "model":
                raise
            return self._own_rule(), None  # no checkpoint yet
        except SignalTimeout as error:
            self.failed_signals += 1
            log.warning("signal request failed: %s", error)
            return None
        if not signal.opinion:
            return self._own_rule(), signal.model_version
        if signal.action == "HOLD":
            self.holds += 1
        return signal.action, signal.model_version

    def _own_rule(self) -> str:
        self.by_own_rule += 1
        side = ACTIONS[int(self.engine.market.rng.integers(3))]
        if side == "HOLD":
            self.holds += 1
        return side


def held_out_loss_rate(
    registry: CheckpointRegistry, version: int, situations: list[Situation], settings: Settings
) -> dict[str, Any]:
    """Replay the fixed held-out situations against one model version: how often it trades,
    and how often those trades lose."""
    import torch

    from negcase.processes.model import build_model, load_verified, spec_from_settings
    from negcase.sim.engine import pnl_pct

    model = build_model(spec_from_settings(settings))
    load_verified(registry.fetch_anywhere(version), model, settings.feature_count)
    model.eval()
    features = torch.tensor([s.features for s in situations], dtype=torch.float32)
    with torch.inference_mode():
        actions = model(features).argmax(dim=1).tolist()
    trades = losses = 0
    for situation, action in zip(situations, actions, strict=True):
        side = ACTIONS[action]
        if side == "HOLD":
            continue
        trades += 1
        losses += pnl_pct(side, situation.move_pct) < 0
    return {
        "version": version,
        "situations": len(situations),
        "trades": trades,
        "losses": losses,
        "loss_rate": round(losses / trades, 4) if trades else None,
    }


def own_rule_loss_rate(situations: list[Situation], seed: int) -> dict[str, Any]:
    """The engine's own rule (a three-sided die) on the held-out situations: where it
    stands without negcase."""
    from negcase.sim.engine import pnl_pct

    rng = random.Random(seed)
    sides = [ACTIONS[rng.randrange(3)] for _ in situations]
    traded = [(side, s) for side, s in zip(sides, situations, strict=True) if side != "HOLD"]
    losses = sum(pnl_pct(side, s.move_pct) < 0 for side, s in traded)
    return {
        "version": None,
        "situations": len(situations),
        "trades": len(traded),
        "losses": losses,
        "loss_rate": round(losses / len(traded), 4),
    }


def live_loss_rates(models: dict[str, dict[str, float]], first: int) -> dict[str, Any]:
    """Loss rate on the engine's own trades: the first model against the latest one that
    made enough trades to say."""
    versions = sorted(
        int(v)
        for v, row in models.items()
        if v != "none" and row.get("trades", 0) >= MIN_TRADES_FOR_RATE
    )
    latest = versions[-1] if versions else None

    def row(version: int | None) -> dict[str, Any] | None:
        if version is None or str(version) not in models:
            return None
        r = models[str(version)]
        return {
            "version": version,
            "trades": r.get("trades", 0),
            "losses": r.get("losses", 0),
            "loss_rate": r["loss_rate"],
        }

    return {"first": row(first), "latest": row(latest)}


@dataclass
class Screen:
    """Live output: redrawn in place on a terminal, plain lines otherwise, none for --json.

    A redraw moves the cursor up over the live view's own lines only (CSI n F, then CSI J
    to clear below), so the lines said before it stay on the screen."""

    quiet: bool
    redraw: bool = field(default_factory=lambda: sys.stdout.isatty())
    out: Any = field(default_factory=lambda: sys.stdout)
    drawn: int = 0

    def show(self, lines: list[str]) -> None:
        """Print the current state."""
        if self.quiet:
            return
        if self.redraw:
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.out.write(up + "\x1b[J" + "\n".join(lines) + "\n")
            self.drawn = len(lines)
        else:
            self.out.write(" | ".join(lines[1:4]) + "\n")
        self.out.flush()

    def say(self, line: str) -> None:
        """A message outside the live view, below it; the next view is drawn after it."""
        if not self.quiet:
            self.out.write(line + "\n")
            self.out.flush()
            self.drawn = 0


def live_view(
    elapsed_s: float,
    duration_s: float,
    trading: TradingEngine,
    tally: EventTally,
    status: dict[str, Any],
    first_version: int,
) -> list[str]:
    """The lines of the live view."""
    counters, cases = status["counters"], status["cases"]
    priorities = "  ".join(f"P{p} {tally.cases_by_priority.get(p, 0)}" for p in "54321")
    sessions = tally.sessions
    rates = live_loss_rates(status["models"], first_version)
    first, latest = rates["first"], rates["latest"]
    return [
        f"negcase demo  {elapsed_s:5.1f} s / {duration_s:.0f} s",
        f"trades {trading.trades:>6}  wins {counters.get('wins', 0):>5}  losses "
        f"{counters.get('losses', 0):>5}  holds {trading.holds:>4}  signals failed "
        f"{trading.failed_signals}",
        f"cases  {priorities}   queue {cases['queued']} | leased {cases['leased']} | done "
        f"{cases['done']} | dead {cases['dead']}",
        f"training {sum(sessions.values())} sessions ({sessions.get('published', 0)} published, "
        f"{sessions.get('rejected', 0)} rejected)  checkpoint v{status['latest_checkpoint']}  "
        f"reloads {len(tally.loaded_versions)}  dead letters {status['trades']['dead_letters']}",
        "loss rate  " + _rate_text("first", first) + "   " + _rate_text("latest", latest),
        _serving_text(status["live"], tally.serving),
    ]


def _serving_text(live: dict[str, Any], changes: Counter[str]) -> str:
    """What serves now, and how many of each serving decision so far."""
    trial = live["canary"]
    canary = (
        "no canary"
        if trial is None
        else f"canary v{trial['version']} {trial['outcomes']}/{trial['min_outcomes']} outcomes"
    )
    counts = ", ".join(f"{changes.get(kind, 0)} {kind}" for kind in SERVING_CHANGES[1:])
    return f"serving    v{live['service']} in service, {canary} ({counts})"


def _rate_text(label: str, row: dict[str, Any] | None) -> str:
    if row is None:
        return f"{label}: (too few trades yet)"
    return f"{label} v{row['version']}: {row['loss_rate']:.1%} of {row['trades']} trades"


def summarize(
    status: dict[str, Any],
    trading: TradingEngine,
    tally: EventTally,
    held_out: dict[str, Any],
    first_version: int,
    duration_s: float,
    exit_codes: dict[str, int],
) -> dict[str, Any]:
    """The end-of-demo summary (also the --json output)."""
    counters = status["counters"]
    return {
        "duration_s": round(duration_s, 1),
        "trades_published": trading.trades,
        "holds": trading.holds,
        "decided_by_own_rule": trading.by_own_rule,
        "skips": counters.get("skips", 0),
        "missed_opportunities": counters.get("opportunities", 0),
        "signal_requests_failed": trading.failed_signals,
        "trades_valid": counters.get("trades", 0),
        "wins": counters.get("wins", 0),
        "losses": counters.get("losses", 0),
        "cases_by_priority": {p: tally.cases_by_priority.get(p, 0) for p in "54321"},
        "cases": {k: status["cases"][k] for k in ("total", "queued", "leased", "done", "dead")},
        "dead_letters": status["trades"]["dead_letters"],
        "training_sessions": dict(tally.sessions),
        "latest_checkpoint": status["latest_checkpoint"],
        "checkpoints_published": tally.types.get("checkpoint_published", 0),
        "reloads": len(tally.loaded_versions),
        "serving": {
            "in_service": status["live"]["service"],
            "canary": (status["live"]["canary"] or {}).get("version"),
            **{kind: tally.serving.get(kind, 0) for kind in SERVING_CHANGES},
        },
        "checkpoints_rejected_by_inference": tally.types.get("checkpoint_rejected", 0),
        "loss_rate_live": live_loss_rates(status["models"], first_version),
        "loss_rate_held_out": held_out,
        "per_model_version": status["models"],
        "worker_exit_codes": exit_codes,
    }


def render_summary(summary: dict[str, Any]) -> str:
    """The summary for people."""
    held, live = summary["loss_rate_held_out"], summary["loss_rate_live"]
    by_priority = ", ".join(f"P{p} {n}" for p, n in summary["cases_by_priority"].items())

    def held_text(row: dict[str, Any] | None) -> str:
        if row is None:
            return "none (no checkpoint)"
        rate = "n/a" if row["loss_rate"] is None else f"{row['loss_rate']:.1%}"
        name = "own rule" if row["version"] is None else f"v{row['version']}"
        return f"{name} {rate} ({row['trades']} of {row['situations']} traded)"

    return "\n".join(
        [
            f"summary after {summary['duration_s']} s",
            f"  trades            {summary['trades_published']} published "
            f"({summary['wins']} wins, {summary['losses']} losses), {summary['holds']} holds "
            f"({summary['missed_opportunities']} missed a move), "
            f"{summary['decided_by_own_rule']} by the engine's own rule, "
            f"{summary['signal_requests_failed']} failed signal requests",
            f"  negative cases    {by_priority}",
            "  case queue        " + ", ".join(f"{n} {k}" for k, n in summary["cases"].items()),
            "  training sessions "
            + (", ".join(f"{n} {k}" for k, n in summary["training_sessions"].items()) or "none"),
            f"  checkpoints       latest v{summary['latest_checkpoint'] or '-'}, "
            f"{summary['reloads']} reloads by the inference worker",
            f"  serving           {_serving_summary(summary['serving'])}",
            f"  dead letters      {summary['dead_letters']} malformed events, each with a reason",
            f"  loss rate, held-out situations: {held_text(held['own_rule'])} -> first "
            f"{held_text(held['first'])} -> latest {held_text(held['latest'])}",
            "  loss rate, the engine's own trades: "
            + _rate_text("first", live["first"])
            + " -> "
            + _rate_text("latest", live["latest"]),
            f"  workers stopped   {_exit_text(summary['worker_exit_codes'])}",
        ]
    )


def _serving_summary(serving: dict[str, Any]) -> str:
    canary = "" if serving["canary"] is None else f", canary v{serving['canary']} on trial"
    return (
        f"v{serving['in_service']} in service{canary}; {serving['canary_started']} canaries: "
        f"{serving['promoted']} promoted, {serving['retired']} retired, "
        f"{serving['rollback']} rollbacks"
    )


def _exit_text(codes: dict[str, int]) -> str:
    failed = {name: code for name, code in codes.items() if code != 0}
    if not failed:
        return f"all {len(codes)} exited cleanly"
    return ", ".join(f"{name} exited with {code}" for name, code in failed.items())


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase demo`."""
    parser = sub.add_parser(
        "demo",
        parents=[connection_options(), archive_options(), logging_options()],
        help="run the whole loop on a local Redis with a synthetic trading engine",
        description=(
            "Start a local redis-server (unless NEGCASE_REDIS_URL is set), one loss detector, "
            "two trainers and one inference worker as real processes, and a synthetic trading "
            "engine that asks for a signal before each trade on a simulated market whose "
            "hidden rule can be learnt (several symbols, drifting regimes, leverage and fees, "
            "a share of malformed events). Shows the loop live, then prints a summary with the "
            "loss rate of the first model against the latest, and stops everything it started. "
            f"It works in its own namespace, --namespace (default {DEMO_NAMESPACE}; never "
            "NEGCASE_NAMESPACE, which names your deployment's), refuses one that holds data "
            "it did not write, and clears what an earlier demo left there. The archive is "
            "left in --data-dir (default testcases/negative; never NEGCASE_DATA_DIR)."
        ),
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to trade (60)")
    parser.add_argument("--rate", type=float, default=40.0, help="trades tried per second (40)")
    parser.add_argument("--seed", type=int, default=7, help="market seed (7)")
    parser.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo to the end of --duration or Ctrl-C."""
    from negcase.client.signal_client import SignalClient
    from negcase.sim.engine import Market, SyntheticEngine, held_out_situations

    if args.duration <= 0 or args.rate <= 0:
        raise CommandError("--duration and --rate must be positive")
    screen = Screen(quiet=args.json)
    # SIGTERM stops the demo like Ctrl-C: the workers and Redis are stopped, not orphaned.
    interrupt_on_sigterm()
    with demo_redis(demo_settings(args)) as settings:
        client = connect(settings.redis_url or "")
        cleared = claim_namespace(client, settings.keys, settings.partitions)
        screen.say(
            f"negcase demo: Redis {redacted(settings.redis_url or '')}, namespace "
            f"{settings.namespace}{' (an earlier demo cleared)' if cleared else ''}, archive "
            f"{settings.data_dir}"
        )
        supervisor = Supervisor(settings, settings.data_dir / "logs")
        run_id = time.strftime("%Y%m%d%H%M%S")
        market = Market(feature_count=settings.feature_count, seed=args.seed)
        trading = TradingEngine(
            client,
            settings,
            SyntheticEngine(market, prefix=f"demo-{run_id}"),
            SignalClient(client, settings.namespace, settings.feature_count),
        )
        tally = EventTally(settings.keys, settings.partitions)
        started = time.monotonic()
        try:
            start_workers(supervisor)
            screen.say("waiting for the workers to start ...")
            wait_for_signals(trading.signals, settings.feature_count, supervisor, timeout_s=120)
            started = time.monotonic()
            next_view_s = started
            while (elapsed := time.monotonic() - started) < args.duration:
                trading.trade(max(1, round(args.rate * TICK_S)))
                if crashed := supervisor.exited():
                    raise CommandError(
                        f"a worker exited early: {crashed} (logs in {supervisor.log_dir})"
                    )
                time.sleep(max(0.0, TICK_S - (time.monotonic() - started - elapsed)))
                if time.monotonic() >= next_view_s:
                    tally.update(client)
                    status = gather_status(client, settings.keys, settings.partitions)
                    screen.show(
                        live_view(elapsed, args.duration, trading, tally, status, FIRST_VERSION)
                    )
                    next_view_s += 1.0
            wait_for_detector(client, settings, timeout_s=15.0)
        except KeyboardInterrupt:
            screen.say("interrupted: stopping")
        finally:
            exit_codes = supervisor.stop_all()
        duration_s = time.monotonic() - started
        tally.update(client)
        status = gather_status(client, settings.keys, settings.partitions)
        registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir))
        situations = held_out_situations(args.seed, settings.feature_count, HELD_OUT_PER_REGIME)
        latest = status["latest_checkpoint"]
        held_out = {
            "own_rule": own_rule_loss_rate(situations, args.seed),
            "first": latest and held_out_loss_rate(registry, FIRST_VERSION, situations, settings),
            "latest": latest and held_out_loss_rate(registry, latest, situations, settings),
        }
        summary = summarize(status, trading, tally, held_out, FIRST_VERSION, duration_s, exit_codes)
        print(
            orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
            if args.json
            else render_summary(summary)
        )
        return 0 if all(code == 0 for code in exit_codes.values()) else 1


def demo_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and flags, except the namespace and the archive: those
    come from the demo's flags or its own defaults, never from NEGCASE_NAMESPACE or
    NEGCASE_DATA_DIR, which describe the user's own deployment. Canary trials are shorter
    than a deployment's (DEMO_CANARY) unless the environment sets them, so a minute shows
    several."""
    defaults = Settings()
    trials = {
        name: value for name, value in DEMO_CANARY.items() if variable_of(name) not in os.environ
    }
    return settings_from(args).with_overrides(
        namespace=args.namespace or DEMO_NAMESPACE,
        data_dir=args.data_dir or defaults.data_dir,
        **trials,
    )


def start_workers(
    supervisor: Supervisor, prefix: str = "demo", trainers: int = 2, batch: int = 4
) -> None:
    """One detector, `trainers` trainers (claiming `batch` cases at a time), one inference
    worker, named `<prefix>-...` (a trainer's name seeds its sampling)."""
    supervisor.start("detector", "detect", "--consumer", f"{prefix}-detector", "--block-ms", "200")
    for n in range(1, trainers + 1):
        supervisor.start(
            f"trainer-{n}",
            "train",
            "--consumer",
            f"{prefix}-trainer-{n}",
            "--batch-size",
            str(batch),
        )
    supervisor.start("inference", "serve", "--consumer", f"{prefix}-inference", "--block-ms", "200")


def wait_for_signals(
    signals: SignalClient,
    feature_count: int,
    supervisor: Supervisor,
    timeout_s: float,
) -> None:
    """Block until the inference worker answers (with a signal, or with the error reply that
    says no checkpoint exists yet), so no trade waits on a worker's start-up."""
    from negcase.client.signal_client import SignalTimeout
    from negcase.schemas.signal import SignalRequestError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if crashed := supervisor.exited():
            raise CommandError(f"a worker exited early: {crashed} (logs in {supervisor.log_dir})")
        try:
            signals.request([0.0] * feature_count, timeout_s=1.0)
        except SignalTimeout:
            continue
        except SignalRequestError:
            pass  # an error reply ("no checkpoint yet") is an answer too
        return
    raise CommandError(f"the inference worker did not answer within {timeout_s:.0f} s")


def wait_for_detector(client: redis.Redis, settings: Settings, timeout_s: float) -> None:
    """Give the detector time to handle the last trades before it is stopped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trades = gather_status(client, settings.keys, settings.partitions)["trades"]
        if trades["pending"] == 0 and not trades["lag"]:
            return
        time.sleep(0.1)
