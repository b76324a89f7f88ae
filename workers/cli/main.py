"""The `negcase` command: one subcommand per job, each in the module that does the job.

Building the parser imports no torch: the commands that need it (workers, demo, benches)
import it inside their run functions, so `--help`, `status`, `health`, `tail` and `case`
start in a fraction of a second (compose runs `health` in every container every 10 s).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from negcase import __version__
from negcase.cli import (
    backtest,
    bootstrap,
    cases,
    checkpoints,
    config,
    consumers,
    dashboard,
    predict,
    publish,
    redis_server,
    status,
    tail,
    workers,
)
from negcase.cli.options import CommandError, setup_logging
from negcase.sim import bench, demo

REGISTRARS = [
    demo.register,
    backtest.register,
    workers.register_detect,
    workers.register_train,
    workers.register_serve,
    predict.register,
    publish.register,
    status.register,
    tail.register,
    cases.register,
    consumers.register,
    dashboard.register,
    checkpoints.register,
    config.register,
    bootstrap.register,
    redis_server.register,
    bench.register,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="negcase",
        description=(
            "negcase learns from losing trades: a loss detector turns each losing trade on "
            "the Redis stream <ns>:trades (and each skipped decision that missed a profitable "
            "move) into a prioritized negative case, training workers retrain a PyTorch "
            "model on the worst cases first and publish checkpoints, and inference workers "
            "hot-reload each checkpoint while they keep answering."
        ),
        epilog=(
            "Every command reads NEGCASE_REDIS_URL (redis://, rediss://, unix://; default "
            "redis://127.0.0.1:6379/0) and NEGCASE_NAMESPACE (default negcase); `negcase "
            "config` shows every setting. Run `negcase demo` to see the whole loop on a local "
            "Redis."
        ),
    )
    parser.add_argument("--version", action="version", version=f"negcase {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args)
        return int(args.run(args) or 0)
    except CommandError as error:
        print(f"negcase {args.command}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`negcase config | head`): not an error worth a traceback.
        # Point stdout at /dev/null so that flushing it at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
