"""`negcase backtest`: does learning from losses make an engine lose less, on real bars?

A walk forward over one file of bars, through the real pipeline. The train part (the first
70 % by default) is traded bar by bar by an engine that asks negcase for a signal at every
decision and falls back to the control rule while there is no checkpoint; every closed
trade goes to the detector, the trainers and the inference worker, running as processes in
a namespace of their own, and the engine waits for them to catch up before each decision.
The held-out part is never published: the control rule, the first and the latest
checkpoint (pinned), the served policy (the live logic carried on over the held-out bars,
served.py), an offline model trained on every train bar, and always BUY are each judged on
it, decision for decision (verdict.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
import torch

from negcase.client.predictor import Predictor
from negcase.processes.model import spec_from_settings
from negcase.processes.reloader import LoadedModel
from negcase.runtime.settings import Settings
from negcase.schemas.signal import Signal, signal_from_probabilities
from negcase.sim.bars import Bars, read_bars
from negcase.sim.bench_support import drop_namespace
from negcase.sim.demo import EventTally, demo_redis
from negcase.sim.features import (
    FeatureTable,
    builtin_features,
    feature_table,
    load_feature_function,
)
from negcase.sim.offline import train_offline_model
from negcase.sim.pipeline import Pipeline, backtest_namespace
from negcase.sim.progress import ProgressLine, clock
from negcase.sim.served import Served, served_policy
from negcase.sim.supervisor import Supervisor
from negcase.sim.trading import (
    CONTROL_LOOKBACK,
    Terms,
    best_action,
    control_side,
    exit_bar,
    side_pnl_pct,
)
from negcase.sim.verdict import (
    ALWAYS_BUY,
    CONTROL,
    FIRST,
    LATEST,
    OFFLINE,
    SERVED,
    Outcomes,
    block_resamples,
    latest_against,
    row_figures,
    verdict_line,
)
from negcase.sim.walk import Decision, Plan, TrainWalk, make_plan, train_quarters
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.connection import connect
from negcase.store.files import write_atomic

log = logging.getLogger(__name__)

TRAIN_SERVING = ("promoted", "retired", "rollback", "deferred")


@dataclass(frozen=True, slots=True)
class BacktestConfig:
    """What one backtest runs on and how it trades (the options of `negcase backtest`)."""

    bars_path: Path
    symbol: str
    train_share: float = 0.7
    every: int = 5
    hold: int = 5
    leverage: float = 1.0
    fee_rate: float = 0.0005
    seed: int = 0
    trainers: int = 2
    catch_up_s: float = 60.0
    features: str | None = None
    archive: Path | None = None
    trades_out: Path | None = None


@dataclass
class Market:
    """The bars, their features, and which bars decide."""

    bars: Bars
    features: FeatureTable
    plan: Plan
    terms: Terms
    symbol: str


def prepare(config: BacktestConfig, settings: Settings) -> Market:
    """Read the bars and compute the features and the plan, before anything starts; errors
    name what is wrong (BarsError, FeatureError, PlanError, or an OSError for a folder)."""
    archive = config.archive
    if archive is not None and archive.exists() and any(archive.iterdir()):
        raise FileExistsError(f"{archive} is not empty: a run's archive never mixes with another")
    if config.trades_out is not None:
        check_writable(config.trades_out)
    bars = read_bars(config.bars_path)
    function = load_feature_function(config.features) if config.features else builtin_features
    table = feature_table(bars, function)
    terms = Terms(config.hold, config.leverage, config.fee_rate, settings.min_profitable_move_pct)
    plan = make_plan(len(bars), table.first, config.train_share, config.every, terms)
    return Market(bars, table, plan, terms, config.symbol)


@dataclass(frozen=True, slots=True)
class BacktestResult:
    """A finished backtest: its report (the --json output), and what each row did at every
    held-out decision (for the equity curves)."""

    report: dict[str, Any]
    outcomes: list[Outcomes]
    dates: list[str]


def run_backtest(
    config: BacktestConfig, market: Market, base: Settings, progress: ProgressLine | None = None
) -> BacktestResult:
    """Run one backtest on a prepared market to the end."""
    started_s = time.monotonic()
    progress = progress or ProgressLine(market.plan.train_end - market.plan.first)
    settings = base.with_overrides(seed=config.seed, feature_count=market.features.count)
    with demo_redis(settings) as settings, _run_archive(config.archive) as archive:
        settings = settings.with_overrides(
            namespace=backtest_namespace(settings.namespace), data_dir=archive
        )
        client = connect(settings.redis_url or "")
        try:
            walked = _walk(client, settings, market, config, progress)
            progress.say("judging the held-out part")
            evaluated_s = time.monotonic()
            outcomes, report = _report(client, settings, market, config, walked)
            report["run"] |= {
                "walk_s": round(walked.walk_s, 1),
                "evaluation_s": round(time.monotonic() - evaluated_s, 1),
                "total_s": round(time.monotonic() - started_s, 1),
            }
            progress.say(_run_summary(report["run"]))
        finally:
            drop_namespace(client, settings.namespace)
            client.close()
    dates = [market.bars.label(t) for t in market.plan.held_out]
    return BacktestResult(report, outcomes, dates)


def _run_summary(run: dict[str, Any]) -> str:
    late = run["pipeline_late"]
    caught_up = (
        "the pipeline caught up before every decision"
        if not late
        else f"the pipeline was late {late} times: this run may not reproduce"
    )
    return (
        f"done in {clock(run['total_s'])} (train walk {clock(run['walk_s'])}, judging "
        f"{clock(run['evaluation_s'])}); {caught_up}"
    )


@contextlib.contextmanager
def _run_archive(keep_in: Path | None) -> Iterator[Path]:
    """The run's archive: `keep_in` (found empty by prepare, kept), else a scratch folder
    removed when the run succeeds and kept, with the workers' logs, when it fails."""
    if keep_in is not None:
        keep_in.mkdir(parents=True, exist_ok=True)
        yield keep_in
        return
    folder = Path(tempfile.mkdtemp(prefix="negcase-backtest-"))
    try:
        yield folder
    except BaseException:
        log.warning("the run's archive and worker logs are kept in %s", folder)
        raise
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Walked:
    """The train part, done: its decisions, and how the pipeline kept up."""

    decisions: list[Decision]
    walk_s: float
    exit_codes: dict[str, int]
    waits: int
    late: int
    failed_requests: int
    trades_out_error: str | None


def _walk(
    client: redis.Redis,
    settings: Settings,
    market: Market,
    config: BacktestConfig,
    progress: ProgressLine,
) -> Walked:
    """Run the pipeline's workers and the engine over the train part."""
    supervisor = Supervisor(settings, settings.data_dir / "logs")
    pipeline = Pipeline(client, settings, supervisor, config.catch_up_s)
    progress.say(
        f"starting a detector, {config.trainers} trainer(s) and an inference worker "
        f"(namespace {settings.namespace})"
    )
    try:
        pipeline.start(config.trainers)
        progress.start()
        started_s = time.monotonic()
        walk = TrainWalk(
            market.bars,
            market.features,
            market.plan,
            market.terms,
            market.symbol,
            pipeline,
            progress,
        )
        decisions = walk.run()
        walk_s = time.monotonic() - started_s
    finally:
        exit_codes = pipeline.stop()
    trades_out_error = None
    if config.trades_out is not None:
        trades_out_error = write_trades(config.trades_out, walk.published)
    return Walked(
        decisions,
        walk_s,
        exit_codes,
        pipeline.waits,
        pipeline.late,
        pipeline.failed_requests,
        trades_out_error,
    )


def check_writable(path: Path) -> None:
    """Before a run starts: OSError unless `path` can be written once the train part is done
    (its folder exists and is writable, and it is not a folder itself)."""
    if path.is_dir():
        raise IsADirectoryError(f"--trades-out: {path} is a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--trades-out: {path.parent} is not a folder")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"--trades-out: {path.parent} is not writable")


def write_trades(path: Path, trades: list[dict[str, Any]]) -> str | None:
    """The train part's trades and skips as JSON lines of TradeClosed, in the order they were
    published (what `negcase bootstrap --trades` reads to start a deployment's first model
    from this history), written whole. Returns why it could not be written, or None: the
    run's report matters more than this copy of its history, so it is not raised."""
    try:
        write_atomic(path, b"".join(orjson.dumps(trade) + b"\n" for trade in trades))
    except OSError as error:
        log.error("--trades-out: %s not written (%s); the report follows", path, error)
        return f"{path}: {error.strerror or error}"
    return None


def _report(
    client: redis.Redis,
    settings: Settings,
    market: Market,
    config: BacktestConfig,
    walked: Walked,
) -> tuple[list[Outcomes], dict[str, Any]]:
    bars, plan = market.bars, market.plan
    registry = CheckpointRegistry(client, settings.keys, Archive(settings.data_dir))
    versions = [info.version for info in registry.list()]
    first, latest = (min(versions), registry.latest_version()) if versions else (None, None)
    # What the train walk did, read before the served policy adds its serving changes.
    tally = EventTally(settings.keys)
    tally.update(client)
    # Before anything else reads the namespace: the live logic carries on over the held-out
    # part (it writes live windows and serving changes there, never a checkpoint).
    served = served_policy(client, settings, registry, market, _held_out_rows(market))
    outcomes = held_out_outcomes(client, settings, market, config.seed, first, latest, served)
    indices = block_resamples(len(plan.held_out), config.seed)
    rows = [row_figures(row, outcomes[0], indices) for row in outcomes]
    decisions = walked.decisions
    return outcomes, {
        "market": {
            "file": str(config.bars_path),
            "symbol": market.symbol,
            "bars": len(bars),
            "from": bars.label(0),
            "to": bars.label(len(bars) - 1),
            "features": config.features or "built-in",
            "feature_count": market.features.count,
        },
        "options": {
            **{
                k: v
                for k, v in asdict(config).items()
                if k not in ("bars_path", "archive", "trades_out")
            },
            "control_rule": f"momentum: the sign of the last {CONTROL_LOOKBACK} bars' move",
            "first_checkpoint_after_outcomes": settings.min_outcomes,
            "canary": {
                "share": settings.canary_share,
                "min_outcomes": settings.canary_min_outcomes,
                "live_window": settings.live_window,
                "auto_rollback": settings.auto_rollback,
            },
        },
        "held_out": {
            "from": bars.label(plan.train_end),
            "to": bars.label(len(bars) - 1),
            "decisions": len(plan.held_out),
            "rows": rows,
            "latest_against": latest_against(outcomes, indices),
        },
        "cases": {
            "total": sum(tally.cases_by_priority.values()),
            "by_priority": {p: tally.cases_by_priority.get(p, 0) for p in "54321"},
            "by_label": {a: tally.cases_by_label.get(a, 0) for a in ("BUY", "SELL", "HOLD")},
        },
        "training": {
            "sessions": dict(sorted(tally.sessions.items())),
            "checkpoints_published": tally.types.get("checkpoint_published", 0),
            # the live logic's decisions during the train walk (the held-out ones: `served`)
            "serving_changes": {kind: tally.types.get(kind, 0) for kind in TRAIN_SERVING},
            "first_checkpoint": first,
            "latest_checkpoint": latest,
        },
        "train_part": {
            "from": bars.label(plan.first),
            "to": bars.label(plan.train_end - 1),
            "decisions": len(decisions),
            "trades": sum(d.pnl_pct is not None for d in decisions),
            "losses": sum(d.pnl_pct is not None and d.pnl_pct < 0 for d in decisions),
            "by_control": sum(d.by == "control" for d in decisions),
            "quarters": train_quarters(decisions, bars),
        },
        "served": served_summary(served, bars, plan),
        "verdict": verdict_line(rows),
        "run": {
            "pipeline_waits": walked.waits,
            "pipeline_late": walked.late,
            "failed_signal_requests": walked.failed_requests,
            "worker_exit_codes": walked.exit_codes,
            "trades_out_error": walked.trades_out_error,
        },
    }


def _held_out_rows(market: Market) -> np.ndarray:
    return market.features.rows[list(market.plan.held_out)]


def served_summary(served: Served, bars: Bars, plan: Plan) -> dict[str, Any]:
    """What the live logic did over the held-out part: the version in service at its start
    and end, each change it made (with the bar it came before), and which versions answered
    how many decisions (`control`: the control rule, no model or no opinion)."""
    answered = Counter("control" if v is None else f"v{v}" for v in served.answered_by)
    return {
        "in_service_first": served.in_service[0] if served.in_service else None,
        "in_service_last": served.in_service[-1] if served.in_service else None,
        "changes": list(served.changes),
        "answered_by": dict(sorted(answered.items())),
        "decisions": len(plan.held_out),
        "from": bars.label(plan.train_end),
    }


def held_out_outcomes(
    client: redis.Redis,
    settings: Settings,
    market: Market,
    seed: int,
    first: int | None,
    latest: int | None,
    served: Served,
) -> list[Outcomes]:
    """What each policy does at every held-out decision, the control rule first."""
    bars, plan = market.bars, market.plan
    rows = _held_out_rows(market)

    def outcomes(name: str, version: int | None, sides: tuple[str, ...]) -> Outcomes:
        pnl = [
            side_pnl_pct(bars, t, side, market.terms, market.symbol)
            for t, side in zip(plan.held_out, sides, strict=True)
        ]
        return Outcomes(name, version, sides, np.array([np.nan if p is None else p for p in pnl]))

    control = tuple(control_side(bars, t) for t in plan.held_out)

    def as_served(signals: list[Signal]) -> tuple[str, ...]:
        # As an engine uses a model: its action where it has an opinion, its own rule elsewhere.
        return tuple(s.action if s.opinion else c for s, c in zip(signals, control, strict=True))

    def checkpoint(name: str, version: int | None) -> Outcomes:
        if version is None:
            return Outcomes(name, None, (), np.zeros(0))
        with Predictor(client, settings, name=f"backtest-v{version}", version=version) as pinned:
            return outcomes(name, version, as_served([pinned.predict(row) for row in rows]))

    return [
        outcomes(CONTROL, None, control),
        checkpoint(FIRST, first),
        checkpoint(LATEST, latest),
        outcomes(SERVED, None, served.sides),
        outcomes(OFFLINE, None, as_served(offline_signals(settings, market, seed, rows))),
        outcomes(ALWAYS_BUY, None, ("BUY",) * len(plan.held_out)),
    ]


def offline_signals(
    settings: Settings, market: Market, seed: int, held_out_rows: np.ndarray
) -> list[Signal]:
    """The offline model's signal at each held-out decision, after training it on every bar
    of the train part whose position closes within it."""
    # One thread: the same sums in the same order on any machine, so the model reproduces.
    torch.set_num_threads(1)
    plan, terms = market.plan, market.terms
    bars_ = [t for t in range(plan.first, plan.train_end) if exit_bar(t, terms) < plan.train_end]
    model = train_offline_model(
        spec_from_settings(settings),
        market.features.rows[bars_],
        [best_action(market.bars, t, terms) for t in bars_],
        seed,
    )
    probabilities = LoadedModel(0, model).probabilities(held_out_rows.astype(np.float32))
    return [
        signal_from_probabilities(row, 0, min_confidence=settings.min_confidence)
        for row in probabilities.tolist()
    ]
