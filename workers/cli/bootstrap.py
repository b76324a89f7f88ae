"""`negcase bootstrap`: a first model from history, so a deployment starts with a model of
its market rather than with nothing (or with a constant policy learnt from one case)."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson

from negcase.cli.options import (
    CommandError,
    archive_options,
    connection_options,
    redis_client,
    settings_from,
)
from negcase.cli.publish import read_json_lines
from negcase.processes.losses import assess_trade
from negcase.runtime.settings import Settings
from negcase.schemas.case import case_id_for
from negcase.schemas.outcome import Outcome
from negcase.schemas.trade import TradeDefaults, TradeError, validate_trade
from negcase.store.archive import Archive
from negcase.store.checkpoints import CheckpointRegistry
from negcase.store.queue import is_held_out


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase bootstrap`."""
    parser = sub.add_parser(
        "bootstrap",
        parents=[connection_options(), archive_options()],
        help="train and publish a first model from a file of past trades and skipped decisions",
        description=(
            "Read trade-close events (TradeClosed, one JSON object per line, skipped decisions "
            "as side HOLD) from FILE, turn each into its outcome with the hindsight label, "
            "train the model on those not held out (the same warm start the trainers make once "
            "NEGCASE_MIN_OUTCOMES outcomes exist) and publish it as a checkpoint. About "
            "NEGCASE_HELDOUT_SHARE of the outcomes are held out to judge it: the model is "
            "published only if its trading result there is not worse than the latest "
            "checkpoint's (with --force); with no checkpoint yet it only has to give finite "
            "output, as the trainers' first checkpoint does."
        ),
    )
    parser.add_argument("--trades", type=Path, required=True, help="JSON lines of TradeClosed")
    parser.add_argument(
        "--force",
        action="store_true",
        help="publish on top of an existing checkpoint (judged against it); default: refuse",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_bootstrap)


def run_bootstrap(args: argparse.Namespace) -> int:
    """Train on the file's outcomes and publish, or say why not."""
    from negcase.processes.bootstrap import bootstrap_model

    settings = settings_from(args)
    history, window = read_outcomes(args.trades, settings)
    if len(history) == 0:
        raise CommandError(f"{args.trades}: no trade with features to learn from")
    client = redis_client(settings)
    archive = Archive(settings.data_dir) if settings.archive else None
    registry = CheckpointRegistry(
        client, settings.keys, archive, settings.keep_checkpoints, settings.events_maxlen
    )
    latest = registry.latest_version()
    if latest is not None and not args.force:
        raise CommandError(f"v{latest} is already published; --force to bootstrap on top of it")
    result = bootstrap_model(registry, settings, history, window)
    figures = {
        "outcomes_trained": len(history),
        "outcomes_held_out": len(window),
        "version": result.version,
        "parent_version": result.parent_version,
        "rejected_reason": result.rejected_reason,
        **result.trading_dict(),
    }
    if args.json:
        print(orjson.dumps(figures).decode())
    elif result.version is not None:
        print(
            f"published v{result.version} from {len(history)} outcomes "
            f"(judged on {len(window)} held out)"
        )
    else:
        print(f"not published: {result.rejected_reason}")
    return 0 if result.version is not None else 1


def read_outcomes(path: Path, settings: Settings) -> tuple[list[Outcome], list[Outcome]]:
    """(training outcomes, held-out outcomes) of a JSON lines file; a line that is not a
    valid trade stops with its number, field and reason."""
    defaults = TradeDefaults(
        settings.feature_count, settings.default_leverage, settings.default_fee_rate
    )
    history: list[Outcome] = []
    window: list[Outcome] = []
    try:
        with path.open() as lines:
            for number, obj in enumerate(read_json_lines(lines), start=1):
                try:
                    outcome = assess_trade(validate_trade(obj, defaults), settings, 0).outcome
                except TradeError as error:
                    raise CommandError(f"{path}: trade {number}: {error}") from None
                if outcome is None:
                    continue
                held = is_held_out(case_id_for(outcome.trade_id), settings.heldout_share)
                (window if held else history).append(outcome)
    except OSError as error:
        raise CommandError(f"{path}: {error.strerror}") from None
    return history, window
