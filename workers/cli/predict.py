"""`negcase predict`: one signal through the remote path, or from one pinned version in this
process, printed for people or as JSON."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import orjson
import redis

from negcase.cli.options import (
    CommandError,
    archive_options,
    connection_options,
    redis_client,
    settings_from,
)
from negcase.runtime.settings import Settings

if TYPE_CHECKING:
    from negcase.schemas.signal import Signal


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase predict`."""
    parser = sub.add_parser(
        "predict",
        parents=[connection_options(), archive_options()],
        help="ask the inference workers for one signal and print the reply",
        description=(
            "Send one request to <ns>:signals:requests, wait for the reply on "
            "<ns>:signals:reply:<request_id> and print it (--json: the reply as it travels). "
            "Exit status 1 when the reply is an error (it names the field and the reason), 2 "
            "when none came in time. With --version N, answer in this process with checkpoint "
            "vN instead, loaded from Redis or, when Redis no longer keeps it, from the "
            "archive's models/ (--data-dir), verified exactly as inference workers verify a "
            "hot reload."
        ),
    )
    parser.add_argument(
        "--features", required=True, help="JSON array of the feature values, e.g. '[0.1, 0.2]'"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=2.0, help="how long to wait for the reply (default 2)"
    )
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.add_argument(
        "--version",
        type=int,
        help="answer with this checkpoint version, pinned, in this process (default: ask the "
        "inference workers, which serve latest)",
    )
    parser.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Send one request through the remote path (or answer with the pinned --version) and
    print the reply."""
    # numpy comes with this: imported here so that `negcase --help` does without it.
    from negcase.schemas.signal import SignalRequestError

    settings = settings_from(args)
    try:
        features = orjson.loads(args.features)
    except orjson.JSONDecodeError as error:
        raise CommandError(f"--features: not JSON ({error})") from None
    client = redis_client(settings)
    try:
        if args.version is None:
            signal = _remote(client, settings, features, args.timeout_s)
        else:
            signal = _pinned(client, settings, args.version, features)
    except SignalRequestError as error:
        if args.json:
            print(orjson.dumps({"error": {"field": error.field, "reason": error.reason}}).decode())
        else:
            print(f"error: {error.field}: {error.reason}")
        return 1
    print(signal.to_json().decode() if args.json else signal_text(signal))
    return 0


def _remote(client: redis.Redis, settings: Settings, features: Any, timeout_s: float) -> Signal:
    from negcase.client.signal_client import SignalClient, SignalTimeout

    try:
        return SignalClient(client, settings.namespace).request(features, timeout_s)
    except SignalTimeout as error:
        raise CommandError(f"{error}: is `negcase serve` running?") from None


def _pinned(client: redis.Redis, settings: Settings, version: int, features: Any) -> Signal:
    # torch comes with these: imported here so that `negcase --help` does without it.
    from negcase.client.predictor import Predictor
    from negcase.processes.model import CheckpointError

    predictor = Predictor(client, settings, version=version)
    try:
        predictor.start()
    except CheckpointError as error:
        raise CommandError(f"--version {version}: cannot be loaded: {error.reason}") from None
    return predictor.predict(features)


def signal_text(signal: Signal) -> str:
    """One line for people: the action, its probability, the others, who answered."""
    odds = "  ".join(f"{action} {p:.1%}" for action, p in signal.probabilities.items())
    by = f" by {signal.worker}" if signal.worker else ""
    model = f"model v{signal.model_version}{by}"
    return f"{signal.action} ({signal.confidence:.1%})  |  {odds}  |  {model}"
