"""`negcase predict`: one signal through the remote path, printed for people or as JSON."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import orjson

from negcase.cli.options import CommandError, connection_options, redis_client, settings_from

if TYPE_CHECKING:
    from negcase.schemas.signal import Signal


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase predict`."""
    parser = sub.add_parser(
        "predict",
        parents=[connection_options()],
        help="ask the inference workers for one signal and print the reply",
        description=(
            "Send one request to <ns>:signals:requests, wait for the reply on "
            "<ns>:signals:reply:<request_id> and print it (--json: the reply as it travels). "
            "Exit status 1 when the reply is an error (it names the field and the reason), 2 "
            "when none came in time."
        ),
    )
    parser.add_argument(
        "--features", required=True, help="JSON array of the feature values, e.g. '[0.1, 0.2]'"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=2.0, help="how long to wait for the reply (default 2)"
    )
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Send one request through the remote path and print the reply."""
    # numpy comes with these: imported here so that `negcase --help` does without it.
    from negcase.client.signal_client import SignalClient, SignalTimeout
    from negcase.schemas.signal import SignalRequestError

    settings = settings_from(args)
    try:
        features = orjson.loads(args.features)
    except orjson.JSONDecodeError as error:
        raise CommandError(f"--features: not JSON ({error})") from None
    client = SignalClient(redis_client(settings), settings.namespace)
    try:
        signal = client.request(features, args.timeout_s)
    except SignalTimeout as error:
        raise CommandError(f"{error}: is `negcase serve` running?") from None
    except SignalRequestError as error:
        if args.json:
            print(orjson.dumps({"error": {"field": error.field, "reason": error.reason}}).decode())
        else:
            print(f"error: {error.field}: {error.reason}")
        return 1
    print(signal.to_json().decode() if args.json else signal_text(signal))
    return 0


def signal_text(signal: Signal) -> str:
    """One line for people: the action, its probability, the others, who answered."""
    odds = "  ".join(f"{action} {p:.1%}" for action, p in signal.probabilities.items())
    by = f" by {signal.worker}" if signal.worker else ""
    model = f"model v{signal.model_version}{by}"
    return f"{signal.action} ({signal.confidence:.1%})  |  {odds}  |  {model}"
