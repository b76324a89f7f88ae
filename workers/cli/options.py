"""What every subcommand shares: the connection flags, settings, and the error it reports."""

from __future__ import annotations

import argparse
from pathlib import Path

import redis

from negcase.runtime.settings import Settings, SettingsError
from negcase.store.connection import connect

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class CommandError(Exception):
    """A failure to report to the user in one line, without a traceback."""


def common_options() -> argparse.ArgumentParser:
    """Flags every subcommand takes; each overrides its NEGCASE_* variable."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--redis-url",
        help=f"Redis URL (env NEGCASE_REDIS_URL, default {DEFAULT_REDIS_URL})",
    )
    group.add_argument("--namespace", help="key namespace (env NEGCASE_NAMESPACE, default negcase)")
    group.add_argument(
        "--data-dir",
        type=Path,
        help="archive folder (env NEGCASE_DATA_DIR, default testcases/negative)",
    )
    return parent


def worker_options() -> argparse.ArgumentParser:
    """Flags every long-running worker takes."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("operations")
    group.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port at /metrics (default: off)",
    )
    return parent


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from the environment, then the common flags, then `overrides`."""
    try:
        return Settings.from_env().with_overrides(
            redis_url=args.redis_url,
            namespace=args.namespace,
            data_dir=args.data_dir,
            **overrides,
        )
    except SettingsError as error:
        raise CommandError(str(error)) from None


def redis_client(settings: Settings) -> redis.Redis:
    """A connected client, or a CommandError that says which URL did not answer."""
    url = settings.redis_url or DEFAULT_REDIS_URL
    client = connect(url)
    try:
        client.ping()
    except redis.AuthenticationError as error:
        raise CommandError(f"Redis at {_safe(url)} refused the credentials: {error}") from None
    except redis.ConnectionError as error:
        raise CommandError(
            f"cannot reach Redis at {_safe(url)} ({error}); set NEGCASE_REDIS_URL or "
            "--redis-url, or start one with `negcase redis`"
        ) from None
    return client


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
