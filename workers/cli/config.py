"""`negcase config`: every setting's effective value and where it came from."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from negcase.cli.options import (
    SETTING_FLAGS,
    CommandError,
    archive_options,
    connection_options,
    logging_options,
)
from negcase.runtime.settings import SettingsError, explain, variable_of
from negcase.store.connection import redacted


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase config`."""
    parser = sub.add_parser(
        "config",
        parents=[connection_options(), archive_options(), logging_options()],
        help="print every setting, its value and where it came from",
        description=(
            "Print each setting with its environment variable, its effective value and its "
            "source: default, env (a NEGCASE_* variable) or flag (one given to this command). "
            "A NEGCASE_* variable that names no setting is an error naming the closest one. "
            "The Redis URL is shown without its password."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run_config)


def run_config(args: argparse.Namespace) -> int:
    """Print the effective settings."""
    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    try:
        rows = explain(flags=flags)
    except SettingsError as error:
        raise CommandError(str(error)) from None
    shown = [(name, _shown(name, value), source) for name, value, source in rows]
    if args.json:
        data = {
            name: {"value": value, "source": source, "variable": variable_of(name)}
            for name, value, source in shown
        }
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return 0
    width = max(len(variable_of(name)) for name, _, _ in shown)
    for name, value, source in shown:
        print(f"{variable_of(name):<{width}}  {source:<7}  {_text(value)}")
    return 0


def _text(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _shown(name: str, value: Any) -> Any:
    """A value as JSON data, the Redis URL without its password."""
    if name == "redis_url" and value:
        return redacted(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
