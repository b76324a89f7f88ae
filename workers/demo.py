"""`negcase demo`: the whole loop on one machine, from a local Redis to a summary."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from store.connection import connect
from store.local_redis import LocalRedis
from workers.engine import Market, SyntheticEngine, random_side
from workers.monitor import gather_status
from workers.options import CommandError, common_options, settings_from
from workers.publish import publish_trades
from workers.settings import Settings
from workers.supervisor import Supervisor

REFRESH_S = 1.0


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


def publish_paced(
    client: redis.Redis, settings: Settings, engine: SyntheticEngine, rate: float, tick_s: float
) -> int:
    """Publish about `rate * tick_s` trades, one pipeline, and return how many."""
    count = max(1, round(rate * tick_s))
    trades = engine.trades()
    return publish_trades(client, settings.keys, (next(trades) for _ in range(count)))


def live_line(status: dict[str, Any], published: int, elapsed_s: float) -> str:
    """One line of what is happening now."""
    cases, trades = status["cases"], status["trades"]
    counters = status["counters"]
    by_priority = " ".join(f"P{p}:{n}" for p, n in cases["queued_by_priority"].items())
    return (
        f"[{elapsed_s:5.1f}s] published {published} | wins {counters.get('wins', 0)} "
        f"losses {counters.get('losses', 0)} | cases {by_priority} | "
        f"dead letters {trades['dead_letters']} | pending {trades['pending']}"
    )


def summarize(status: dict[str, Any], published: int, duration_s: float) -> dict[str, Any]:
    """The end-of-demo summary (also the --json output)."""
    counters = status["counters"]
    return {
        "duration_s": round(duration_s, 1),
        "trades_published": published,
        "trades_valid": counters.get("trades", 0),
        "wins": counters.get("wins", 0),
        "losses": counters.get("losses", 0),
        "cases_by_priority": status["cases"]["queued_by_priority"],
        "cases_total": status["cases"]["total"],
        "cases_without_features": status["cases"]["without_features"],
        "dead_letters": status["trades"]["dead_letters"],
        "pending_after_stop": status["trades"]["pending"],
        "per_model_version": status["models"],
    }


def render_summary(summary: dict[str, Any]) -> str:
    """The summary for people."""
    by_priority = ", ".join(f"P{p} {n}" for p, n in summary["cases_by_priority"].items())
    return "\n".join(
        [
            f"summary after {summary['duration_s']} s",
            f"  trades published  {summary['trades_published']} "
            f"({summary['trades_valid']} valid: {summary['wins']} wins, "
            f"{summary['losses']} losses)",
            f"  negative cases    {summary['cases_total']} queued for training ({by_priority}), "
            f"{summary['cases_without_features']} without features",
            f"  dead letters      {summary['dead_letters']} malformed events, each with a reason",
            f"  left pending      {summary['pending_after_stop']}",
            f"  workers stopped   {summary['worker_exit_codes']}",
        ]
    )


def wait_for_drain(client: redis.Redis, settings: Settings, timeout_s: float) -> None:
    """Give the detector time to handle what was published before it is stopped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        trades = gather_status(client, settings.keys)["trades"]
        if trades["pending"] == 0 and not trades["lag"]:
            return
        time.sleep(0.1)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase demo`."""
    parser = sub.add_parser(
        "demo",
        parents=[common_options()],
        help="run the whole loop on a local Redis with a synthetic trading engine",
        description=(
            "Start a local redis-server (unless NEGCASE_REDIS_URL is set), a loss detector "
            "process, and a synthetic trading engine that publishes realistic trades "
            "(several symbols, both sides, leverage, fees, a share of malformed events). "
            "Shows cases arriving by priority, then prints a summary and stops everything "
            "it started. The archive is left in --data-dir (default testcases/negative)."
        ),
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run (60)")
    parser.add_argument("--rate", type=float, default=50.0, help="trades per second (50)")
    parser.add_argument("--seed", type=int, default=7, help="market seed (7)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo to the end of --duration or Ctrl-C."""
    if args.duration <= 0 or args.rate <= 0:
        raise CommandError("--duration and --rate must be positive")
    with demo_redis(settings_from(args)) as settings:
        client = connect(settings.redis_url or "")
        supervisor = Supervisor(settings, settings.data_dir.parent / ".demo-logs")
        market = Market(feature_count=settings.feature_count, seed=args.seed)
        engine = SyntheticEngine(market, random_side(np.random.default_rng(args.seed)))
        say = (lambda _line: None) if args.json else print
        say(f"negcase demo: Redis {settings.redis_url}, archive {settings.data_dir}")
        published = 0
        started = time.monotonic()
        try:
            supervisor.start("detector", "detect", "--consumer", "demo-detector")
            while (elapsed := time.monotonic() - started) < args.duration:
                published += publish_paced(client, settings, engine, args.rate, REFRESH_S)
                if crashed := supervisor.exited():
                    raise CommandError(f"a worker exited early: {crashed} (see its log)")
                time.sleep(REFRESH_S)
                say(live_line(gather_status(client, settings.keys), published, elapsed))
            wait_for_drain(client, settings, timeout_s=15.0)
        except KeyboardInterrupt:
            say("interrupted: stopping")
        finally:
            codes = supervisor.stop_all()
        summary = summarize(
            gather_status(client, settings.keys), published, time.monotonic() - started
        )
        summary["worker_exit_codes"] = codes
        print(
            orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
            if args.json
            else render_summary(summary)
        )
        return 0 if all(code == 0 for code in codes.values()) else 1
