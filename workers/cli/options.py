"""What subcommands share: the flag groups (each command takes only those it uses), settings
from the environment and flags, the Redis client, logging, and the error they report."""

from __future__ import annotations

import argparse
from pathlib import Path

import redis

from negcase.runtime.logging import configure_logging
from negcase.runtime.settings import (
    DEFAULT_REDIS_URL,
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    SettingsError,
)
from negcase.store.connection import (
    Client,
    NamespaceSlotError,
    RedisUrlError,
    check_namespace_slot,
    connect,
    redacted,
)

# Flags that stand for a setting of the same name; a command has those its parents add.
SETTING_FLAGS = ("redis_url", "namespace", "data_dir", "log_level", "log_format")


class CommandError(Exception):
    """A failure to report to the user in one line, without a traceback."""


def one_partition(settings: Settings, what: str) -> Settings:
    """`settings`, for a command that works on one partition by design (in a namespace of its
    own); with NEGCASE_PARTITIONS above 1 it would misread where its data lives: refused."""
    if settings.partitions > 1:
        raise CommandError(
            f"{what} runs on one partition in a namespace of its own; NEGCASE_PARTITIONS is "
            f"{settings.partitions}: unset it (or set it to 1) for this command"
        )
    return settings


def connection_options() -> argparse.ArgumentParser:
    """--redis-url and --namespace: every command that talks to Redis."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--redis-url",
        help=f"Redis URL (env NEGCASE_REDIS_URL, default {DEFAULT_REDIS_URL})",
    )
    group.add_argument("--namespace", help="key namespace (env NEGCASE_NAMESPACE, default negcase)")
    return parent


def archive_options() -> argparse.ArgumentParser:
    """--data-dir: only the commands that read or write the disk archive."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--data-dir",
        type=Path,
        help="archive folder (env NEGCASE_DATA_DIR, default testcases/negative)",
    )
    return parent


def logging_options() -> argparse.ArgumentParser:
    """--log-level and --log-format: the long-running commands."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("logging (on stderr)")
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="lowest level logged (env NEGCASE_LOG_LEVEL, default INFO)",
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text for people, json for one object a line (env NEGCASE_LOG_FORMAT, default text)",
    )
    return parent


def worker_options() -> argparse.ArgumentParser:
    """Flags every long-running worker takes: logging and the metrics port."""
    parent = argparse.ArgumentParser(add_help=False, parents=[logging_options()])
    group = parent.add_argument_group("operations")
    group.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at /metrics, and /healthz and /readyz, on this port "
        "(default: off)",
    )
    return parent


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from the environment, then the flags this command has, then `overrides`."""
    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    try:
        return Settings.from_env().with_overrides(**flags, **overrides)
    except SettingsError as error:
        raise CommandError(str(error)) from None


def setup_logging(args: argparse.Namespace) -> None:
    """Configure logging from NEGCASE_LOG_* and this command's --log-* flags."""
    try:
        settings = Settings.from_env().with_overrides(
            log_level=getattr(args, "log_level", None), log_format=getattr(args, "log_format", None)
        )
    except SettingsError as error:
        raise CommandError(str(error)) from None
    configure_logging(settings.log_level, settings.log_format)


def redis_client(settings: Settings) -> Client:
    """A connected client (one server, Sentinel's primary or a Cluster), or a CommandError
    that says which URL did not answer or why the namespace cannot work there."""
    url = settings.redis_url or DEFAULT_REDIS_URL
    try:
        client = connect(url)
        for keys in settings.keys.with_partitions(settings.partitions):
            check_namespace_slot(client, keys)
        client.ping()
    except (RedisUrlError, NamespaceSlotError) as error:
        raise CommandError(str(error)) from None
    except redis.AuthenticationError as error:
        raise CommandError(f"Redis at {redacted(url)} refused the credentials: {error}") from None
    except redis.ConnectionError as error:
        raise CommandError(
            f"cannot reach Redis at {redacted(url)} ({error}); set NEGCASE_REDIS_URL or "
            "--redis-url, or start one with `negcase redis`"
        ) from None
    return client
