"""`negcase publish`: put trade-close events on `<ns>:trades`, one from flags or many from
JSON lines, pipelined (through negcase.client.trades)."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import orjson

from negcase.cli.options import CommandError, connection_options, redis_client, settings_from
from negcase.client.trades import ENCODINGS, publish_trades
from negcase.schemas.trade import SIDES


def read_json_lines(stream: TextIO) -> Iterator[dict[str, Any]]:
    """Trades from JSON lines; a line that is not a JSON object stops with its line number."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            trade = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise CommandError(f"line {number}: not valid JSON ({error})") from None
        if not isinstance(trade, dict):
            raise CommandError(f"line {number}: expected a JSON object")
        yield trade


def trade_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """One trade from the command line flags."""
    missing = [flag for flag in ("symbol", "side", "entry", "exit") if getattr(args, flag) is None]
    if missing:
        raise CommandError("without --file, give " + ", ".join(f"--{name}" for name in missing))
    trade: dict[str, Any] = {
        "trade_id": args.trade_id or f"cli-{uuid.uuid4().hex[:16]}",
        "symbol": args.symbol,
        "side": args.side,
        "entry_price": args.entry,
        "exit_price": args.exit,
        "quantity": args.quantity,
        "leverage": args.leverage,
        "fee_rate": args.fee_rate,
        "model_version": args.model_version,
        "rule_side": args.rule_side,
    }
    if args.features is not None:
        try:
            trade["features"] = orjson.loads(args.features)
        except orjson.JSONDecodeError as error:
            raise CommandError(f"--features: not a JSON array ({error})") from None
    return {name: value for name, value in trade.items() if value is not None}


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase publish`."""
    parser = sub.add_parser(
        "publish",
        parents=[connection_options()],
        help="publish trade-close events to <ns>:trades",
        description=(
            "Publish one trade from flags, or many from JSON lines (--file PATH, or - for "
            "stdin), pipelined. The detector validates them; this command does not, so it "
            "can also be used to send malformed events on purpose."
        ),
        epilog=(
            "example: negcase publish --symbol ETH/USDT --side BUY --entry 3000 --exit 2970 "
            "--features '[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8]'"
        ),
    )
    parser.add_argument("--file", help="JSON lines file of trades, or - for stdin")
    parser.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default="flat",
        help="how each trade is put on the stream (default flat fields)",
    )
    parser.add_argument("--trade-id", help="default: a random cli-<hex> id")
    parser.add_argument("--symbol")
    # Sides in any case, upper-cased before the choice is checked.
    parser.add_argument(
        "--side",
        type=str.upper,
        choices=SIDES,
        help="the side of the position that closed, or HOLD for a skipped decision",
    )
    parser.add_argument(
        "--entry", type=float, help="entry price (for HOLD: the price when the engine decided)"
    )
    parser.add_argument(
        "--exit", type=float, help="exit price (for HOLD: the price at the end of its horizon)"
    )
    parser.add_argument("--quantity", type=float)
    parser.add_argument("--leverage", type=float)
    parser.add_argument("--fee-rate", type=float)
    parser.add_argument("--model-version", type=int)
    parser.add_argument(
        "--rule-side",
        type=str.upper,
        choices=SIDES,
        help="what the engine's own rule would have done on this decision",
    )
    parser.add_argument("--features", help="JSON array of the model's input numbers")
    parser.set_defaults(run=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    """Publish from flags or from JSON lines."""
    settings = settings_from(args)
    client = redis_client(settings)
    keys, encoding, partitions = settings.keys, args.encoding, settings.partitions
    if args.file == "-":
        count = publish_trades(client, keys, read_json_lines(sys.stdin), encoding, partitions)
    elif args.file:
        path = Path(args.file)
        if not path.exists():
            raise CommandError(f"--file {path}: no such file")
        with path.open() as lines:
            count = publish_trades(client, keys, read_json_lines(lines), encoding, partitions)
    else:
        count = publish_trades(client, keys, [trade_from_flags(args)], encoding, partitions)
    where = keys.trades if partitions == 1 else f"the trades streams of {partitions} partitions"
    print(f"published {count} trade(s) to {where}")
    return 0
