"""`negcase backtest --bars FILE`: a walk-forward judgement of learning from losses, on real
bars, through the real pipeline (negcase.sim.backtest does the work).

The backtest's modules bring numpy and torch: they are imported in the run functions, so
that building the parser (`negcase --help`) does without them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from negcase.cli.options import CommandError, one_partition
from negcase.runtime.settings import Settings, SettingsError, variable_of
from negcase.runtime.shutdown import interrupt_on_sigterm

if TYPE_CHECKING:
    from negcase.sim.backtest import BacktestConfig, BacktestResult, Market

HOW_IT_RUNS = (
    "The train part (the first --train-share of the bars) is traded bar by bar by an engine "
    "that asks negcase for a signal at every --every-th bar and holds each position --hold "
    "bars (opened at the bar's open, closed at the close of its last bar). Until a checkpoint "
    "exists (the first comes after NEGCASE_MIN_OUTCOMES outcomes, at most a third of the "
    "train decisions unless that variable is set), or when no answer comes, it uses the "
    "control rule: BUY when the last close is "
    "above the close 20 bars before, SELL when below. Every closed trade is published, with "
    "its features and model_version, to a real loss detector, --trainers trainers and an "
    "inference worker (processes, in a Redis namespace of their own: a local redis-server, "
    "or NEGCASE_REDIS_URL under negcase-backtest-<random>, deleted after), and the engine "
    "waits (at most --catch-up-s) for them to catch up before each decision, so what is "
    "learned from one bar is served at the next: a new version first answers a share of the "
    "decisions as a canary (NEGCASE_CANARY_SHARE, 0.5 here; NEGCASE_CANARY_MIN_OUTCOMES, 30 "
    "here), as live. The held-out part is never published: the control rule, the first and "
    "the latest checkpoint (pinned), the served policy (the live logic carried on over the "
    "held-out bars: whichever published version it puts in service, or on trial, answers), "
    "an offline model of the same architecture trained on every train bar, and always BUY "
    "are judged on it. The features are computed from bars before the decision only (see "
    "negcase.sim.features)."
)


# A deployment's canary (10 % of decisions, judged after 200 outcomes) would take 2,000
# decisions a trial, more than a backtest of 20 years of daily bars has: here a canary
# answers half of them and is judged after 30 outcomes, so a run holds several trials.
BACKTEST_CANARY = {"canary_share": 0.5, "canary_min_outcomes": 30, "live_window": 100}
# A deployment's first checkpoint waits for NEGCASE_MIN_OUTCOMES (200) outcomes, more than
# the whole train part of a market of monthly bars holds: unless the environment sets it,
# a backtest waits for at most a third of its train decisions (and at least
# FIRST_CHECKPOINT_FLOOR), so a short market is judged with a model too.
FIRST_CHECKPOINT_FLOOR = 20


def walk_options() -> argparse.ArgumentParser:
    """How a backtest trades and runs: shared by `backtest` and `bench learn`."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("the walk")
    group.add_argument(
        "--train-share", type=float, default=0.7, help="share of the bars traded live (0.7)"
    )
    group.add_argument("--hold", type=int, default=5, help="bars a position is held (5)")
    group.add_argument("--every", type=int, default=5, help="decide at every k-th bar (5)")
    group.add_argument("--leverage", type=float, default=1.0, help="leverage of each trade (1)")
    group.add_argument(
        "--fee-rate",
        type=float,
        default=0.0005,
        help="fee per round trip, a fraction of notional (0.0005: 0.05 %%)",
    )
    group.add_argument(
        "--seed",
        type=int,
        help="seed of the trainers, the offline model and the bootstrap (env NEGCASE_SEED, 0)",
    )
    group.add_argument(
        "--trainers",
        type=int,
        default=2,
        help="training workers (2); with 1, a fixed --seed gives the same table every run",
    )
    group.add_argument(
        "--catch-up-s",
        type=float,
        default=60.0,
        help="longest wait for the pipeline before a decision goes ahead without it (60)",
    )
    group.add_argument(
        "--redis-url", help="Redis URL (env NEGCASE_REDIS_URL; default: a local redis-server)"
    )
    return parent


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase backtest`."""
    parser = sub.add_parser(
        "backtest",
        parents=[walk_options()],
        help="does learning from losses help? a walk-forward test on real bars",
        description="Read OHLCV bars from a CSV or CSV.gz file (a date/time column and open, "
        "high, low, close, volume, named in any case), run the real pipeline over the train "
        "part, and print how often each policy lost on the held-out part, side by side, with "
        "bootstrap 95 % intervals. " + HOW_IT_RUNS,
    )
    parser.add_argument("--bars", type=Path, required=True, help="CSV or CSV.gz file of bars")
    parser.add_argument("--symbol", help="symbol on the trades (default: the file's name)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw the held-out equity curves (needs matplotlib: pip install 'negcase[plot]')",
    )
    parser.add_argument(
        "--features",
        metavar="MODULE:FUNCTION",
        help="your own features: FUNCTION(past_bars) returns the numbers for the next decision, "
        "or None while history is too short (default: the built-in 8)",
    )
    parser.add_argument(
        "--archive",
        type=Path,
        metavar="DIR",
        help="keep the run's archive (cases, sessions, models, worker logs) in DIR, which must "
        "be empty or new (default: a scratch folder, removed after)",
    )
    parser.add_argument(
        "--trades-out",
        type=Path,
        metavar="FILE.jsonl",
        help="write the train part's trades and skips (TradeClosed JSON lines), to start a "
        "deployment's first model from them with `negcase bootstrap --trades FILE.jsonl`",
    )
    parser.set_defaults(run=run_backtest_command)


def config_from(args: argparse.Namespace, bars: Path, symbol: str, seed: int) -> BacktestConfig:
    """The backtest's configuration from the walk options; CommandError for a bad value."""
    from negcase.sim.backtest import BacktestConfig

    if not 0 < args.train_share < 1:
        raise CommandError("--train-share: must be between 0 and 1")
    if args.hold < 1 or args.every < 1 or args.trainers < 1:
        raise CommandError("--hold, --every and --trainers: must be at least 1")
    if args.leverage < 1 or args.fee_rate < 0 or not args.catch_up_s > 0:
        raise CommandError("--leverage >= 1, --fee-rate >= 0 and --catch-up-s > 0 are required")
    return BacktestConfig(
        bars_path=bars,
        symbol=symbol,
        train_share=args.train_share,
        every=args.every,
        hold=args.hold,
        leverage=args.leverage,
        fee_rate=args.fee_rate,
        seed=seed,
        trainers=args.trainers,
        catch_up_s=args.catch_up_s,
        features=getattr(args, "features", None),
        archive=getattr(args, "archive", None),
        trades_out=getattr(args, "trades_out", None),
    )


def base_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and --redis-url; canary trials scaled to a backtest's
    few hundred decisions (BACKTEST_CANARY) where the environment does not set them."""
    trials = {
        name: value
        for name, value in BACKTEST_CANARY.items()
        if variable_of(name) not in os.environ
    }
    try:
        return Settings.from_env().with_overrides(redis_url=args.redis_url, **trials)
    except SettingsError as error:
        raise CommandError(str(error)) from None


def backtest(config: BacktestConfig, settings: Settings) -> BacktestResult:
    """Run one backtest. Input it cannot use is one CommandError line before anything starts;
    a worker that dies, or Ctrl-C (or SIGTERM), stops everything it started."""
    from negcase.sim.backtest import prepare, run_backtest
    from negcase.sim.bars import BarsError
    from negcase.sim.features import FeatureError
    from negcase.sim.pipeline import PipelineError
    from negcase.sim.walk import PlanError

    one_partition(settings, "a backtest")
    try:
        market = prepare(config, settings)
    except (BarsError, FeatureError, PlanError, OSError) as error:
        raise CommandError(str(error)) from None
    settings = settings.with_overrides(min_outcomes=first_checkpoint_after(market, settings))
    # SIGTERM stops the run like Ctrl-C: the workers and Redis are stopped, not orphaned.
    interrupt_on_sigterm()
    try:
        return run_backtest(config, market, settings)
    except PipelineError as error:
        raise CommandError(str(error)) from None
    except KeyboardInterrupt:
        raise CommandError("interrupted: every worker was stopped") from None


def first_checkpoint_after(market: Market, settings: Settings) -> int:
    """How many outcomes the backtest's trainers wait for before the first checkpoint:
    NEGCASE_MIN_OUTCOMES when the environment sets it, else the setting capped at a third
    of the train part's decisions (FIRST_CHECKPOINT_FLOOR at least)."""
    if variable_of("min_outcomes") in os.environ:
        return settings.min_outcomes
    third = max(FIRST_CHECKPOINT_FLOOR, len(market.plan.train) // 3)
    return min(settings.min_outcomes, third)


def run_backtest_command(args: argparse.Namespace) -> int:
    """Run the backtest and print its report; exit status 1 if a worker did not stop cleanly
    or the --trades-out file could not be written (the log says why)."""
    from negcase.sim.plot import PlotUnavailable, check_plotting, plot_equity
    from negcase.sim.verdict import render_report

    if args.plot:
        try:
            check_plotting()
        except PlotUnavailable as error:
            raise CommandError(str(error)) from None
    settings = base_settings(args)
    symbol = args.symbol or args.bars.name.removesuffix(".gz").removesuffix(".csv")
    seed = settings.seed if args.seed is None else args.seed
    result = backtest(config_from(args, args.bars, symbol, seed), settings)
    report = result.report
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_report(report))
    if args.plot:
        held = report["held_out"]
        title = f"{symbol}: held-out equity, {held['from']} to {held['to']}"
        plot_equity(args.plot, result.outcomes, result.dates, title)
    run = report["run"]
    clean = set(run["worker_exit_codes"].values()) <= {0}
    return 0 if clean and not run["trades_out_error"] else 1
