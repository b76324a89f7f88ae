"""`negcase detect`, `negcase train` and `negcase serve`: the command lines of the worker
processes. The processes themselves live in negcase.processes and never import the CLI.

The worker modules (and torch) are imported inside the run functions: building the parser
for `negcase --help` or `negcase status` must not pay for them."""

from __future__ import annotations

import argparse
import logging

import redis

from negcase.cli.options import (
    CommandError,
    archive_options,
    connection_options,
    positive_int,
    redis_client,
    settings_from,
    worker_options,
)
from negcase.runtime.logging import log_startup
from negcase.runtime.metrics import serve as serve_metrics
from negcase.runtime.shutdown import StopFlag, install_signal_handlers
from negcase.store.keys import DETECTOR_GROUP, INFERENCE_GROUP
from negcase.store.streams import default_consumer_name, leave_group

log = logging.getLogger("negcase.cli.workers")


def register_detect(sub: argparse._SubParsersAction) -> None:
    """Add `negcase detect`."""
    parser = sub.add_parser(
        "detect",
        parents=[connection_options(), archive_options(), worker_options()],
        help="run a loss detector (consumer group 'detectors' on <ns>:trades)",
        description=(
            "Read trade-close events from <ns>:trades in the consumer group 'detectors', turn "
            "every losing trade, and every skipped decision that missed a profitable move, into "
            "a prioritized negative case (stored in Redis, queued for training, archived on "
            "disk), record every decision with features as an outcome (in the replay store, "
            "or the validation window when held out), copy bad entries to <ns>:trades:dead "
            "with the reason, and acknowledge each batch only after it is stored. Several "
            "detectors can run side by side. The first SIGTERM/SIGINT finishes the batch in "
            "hand, and the detector leaves the group unless it still holds pending entries."
        ),
    )
    parser.add_argument(
        "--consumer",
        help="consumer name; give a stable one to resume its "
        "own pending entries after a restart (default host:pid)",
    )
    parser.add_argument("--batch-size", type=int, help="entries per read (default 500)")
    parser.add_argument("--block-ms", type=int, help="how long one read blocks (default 1000)")
    parser.add_argument(
        "--claim-idle-ms",
        type=int,
        help="claim entries another detector left pending this long (default 30000)",
    )
    parser.add_argument("--no-archive", action="store_true", help="do not write the disk archive")
    parser.add_argument("--burst", action="store_true", help="drain the stream, then exit")
    # Checked in run_detect, not by an argparse type: the valid range comes from
    # NEGCASE_PARTITIONS, and the check must come before connecting to Redis.
    parser.add_argument(
        "--partitions",
        metavar="LIST",
        help="with NEGCASE_PARTITIONS above 1: the partitions to consume, e.g. 0,2 "
        "(default all; one thread each)",
    )
    parser.set_defaults(run=run_detect)


def chosen_partitions(text: str | None, count: int) -> list[int]:
    """The partitions `--partitions text` names (all `count` without the flag), or a
    CommandError that echoes the text and names the valid range."""
    if text is None:
        return list(range(count))
    valid = f"NEGCASE_PARTITIONS={count} has " + (
        "partition 0 only" if count == 1 else f"partitions 0 to {count - 1}"
    )
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise CommandError(f"--partitions is empty: give partition numbers; {valid}")
    not_numbers = [part for part in parts if not (part.isascii() and part.isdigit())]
    if not_numbers:
        raise CommandError(
            f"--partitions {text}: {not_numbers[0]!r} is not a partition number; {valid}"
        )
    chosen = sorted({int(part) for part in parts})
    if chosen[-1] >= count:
        raise CommandError(f"--partitions {text}: no partition {chosen[-1]}; {valid}")
    return chosen


def run_detect(args: argparse.Namespace) -> int:
    """Run one detector until stopped (or drained, with --burst)."""
    from negcase.processes.detector import LossDetector, run_detectors
    from negcase.store.archive import Archive

    settings = settings_from(
        args,
        batch_size=args.batch_size,
        block_ms=args.block_ms,
        claim_idle_ms=args.claim_idle_ms,
        archive=False if args.no_archive else None,
    )
    partitions = chosen_partitions(args.partitions, settings.partitions)
    client = redis_client(settings)
    archived = settings.archive
    consumer = args.consumer or default_consumer_name()
    log_startup(log, "detector", settings, consumer, DETECTOR_GROUP)
    stop = StopFlag()
    install_signal_handlers(stop, f"detector {consumer}")
    detectors = [
        # An archive each: detectors of one archive folder share it as processes do.
        LossDetector(
            client, settings, consumer, Archive(settings.data_dir) if archived else None, p
        )
        for p in partitions
    ]
    for detector in detectors[1:]:
        detector.metrics = detectors[0].metrics  # one /metrics for the process
    serve_metrics(detectors[0].metrics.registry, args.metrics_port)
    totals = run_detectors(detectors, stop, burst=args.burst)
    for detector in detectors:
        detector.progress.flush()
        leave(client, detector.keys.trades, DETECTOR_GROUP, consumer)
    log.info(
        "detector %s stopped: %d entries, %d cases added, %d duplicates, %d dead-lettered, %d wins",
        consumer,
        totals.entries,
        totals.cases_added,
        totals.duplicates,
        totals.dead_lettered,
        totals.wins,
    )
    return 0


def register_train(sub: argparse._SubParsersAction) -> None:
    """Add `negcase train`."""
    parser = sub.add_parser(
        "train",
        parents=[connection_options(), archive_options(), worker_options()],
        help="run a training worker (claims cases from <ns>:queue, publishes checkpoints)",
        description=(
            "Claim the worst negative cases from <ns>:queue under a lease, train the model "
            "intensively on them mixed with a replay of earlier cases, and publish the result "
            "as a new checkpoint if it is not worse on the held-out cases (rebasing onto any "
            "checkpoint another trainer published meanwhile). Any number of trainers can run. "
            "The first SIGTERM/SIGINT hands the cases in hand back to the queue and exits."
        ),
    )
    parser.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="cases per claim and session (env NEGCASE_CASES_PER_CLAIM, default 1)",
    )
    parser.add_argument("--model", help="package.module:factory building your own nn.Module")
    parser.add_argument(
        "--consumer", help="trainer name in leases, events and health (default trainer-host:pid)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1: one trainer per core; a trainer alone may take more)",
    )
    parser.add_argument("--lease-s", type=float, help="lease length in seconds (default 30)")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Run one trainer until stopped (or drained, with --burst)."""
    import torch

    from negcase.processes.trainer import Trainer
    from negcase.store.archive import Archive

    settings = settings_from(
        args, cases_per_claim=args.batch_size, model_factory=args.model, lease_s=args.lease_s
    )
    # One thread per trainer by default: N trainers on N cores scale instead of fighting
    # over cores. A trainer alone on a machine may be given its cores (--threads).
    torch.set_num_threads(args.threads)
    client = redis_client(settings)
    archive = Archive(settings.data_dir) if settings.archive else None
    name = args.consumer or f"trainer-{default_consumer_name()}"
    log_startup(log, "trainer", settings, name)
    stop = StopFlag()
    install_signal_handlers(stop, name)
    trainer = Trainer(client, settings, name, archive)
    serve_metrics(trainer.metrics.registry, args.metrics_port)
    outcomes = trainer.run(stop, burst=args.burst)
    summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    log.info("trainer %s stopped after %s", name, summary or "no sessions")
    return 0


def register_serve(sub: argparse._SubParsersAction) -> None:
    """Add `negcase serve`."""
    parser = sub.add_parser(
        "serve",
        parents=[connection_options(), worker_options()],
        help="run an inference worker (consumer group 'inference' on <ns>:signals:requests)",
        description=(
            "Answer signal requests from <ns>:signals:requests in the consumer group "
            "'inference': read a batch, run one forward pass of the model in service (and "
            "one of the canary for its share of requests, chosen by request id), push every "
            "reply to <ns>:signals:reply:<request_id> in one round trip. A thread follows "
            "<ns>:checkpoints and swaps in what <ns>:serving names after verifying it; a "
            "batch is always answered by the same models. The model is built from this worker's "
            "own settings (--model / NEGCASE_MODEL_FACTORY, NEGCASE_HIDDEN_SIZES, "
            "NEGCASE_FEATURE_COUNT), which must match what the trainers were given. Several "
            "workers can run side by side. It is ready (`negcase health --ready`, /readyz) "
            "once it serves a model. The first SIGTERM/SIGINT finishes the batch in hand."
        ),
    )
    parser.add_argument(
        "--consumer", help="consumer name, also shown in replies and events (default host:pid)"
    )
    parser.add_argument("--batch-size", type=int, help="requests per read (default 256)")
    parser.add_argument("--block-ms", type=int, help="how long one read blocks (default 1000)")
    parser.add_argument("--burst", action="store_true", help="answer what is queued, then exit")
    parser.add_argument(
        "--model",
        help=(
            "package.module:factory building your own nn.Module (env NEGCASE_MODEL_FACTORY); "
            "give it the same factory as `negcase train --model`: a checkpoint whose "
            "model_spec differs from this worker's is refused"
        ),
    )
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Run one inference worker until stopped (or drained, with --burst)."""
    from negcase.processes.inference import InferenceWorker
    from negcase.processes.reloader import Reloader, configure_torch_for_serving
    from negcase.store.serving import ServingControl

    settings = settings_from(
        args, serve_batch_size=args.batch_size, block_ms=args.block_ms, model_factory=args.model
    )
    configure_torch_for_serving()
    client = redis_client(settings)
    consumer = args.consumer or default_consumer_name()
    log_startup(log, "inference worker", settings, consumer, INFERENCE_GROUP)
    stop = StopFlag()
    install_signal_handlers(stop, f"serve {consumer}")
    # A worker takes part in the serving decision: it starts a canary when a version is
    # published and reports a checkpoint it cannot load (store/serving.py).
    reloader = Reloader(client, settings, consumer, ServingControl(client, settings)).start()
    # Serve only after the first look at what serves: a worker started after several
    # publishes answers with the version in service from its first reply on.
    while not reloader.synced.wait(0.1):
        if stop.is_set():
            return 0
    worker = InferenceWorker(client, settings, consumer, reloader)
    serve_metrics(worker.metrics.registry, args.metrics_port, lambda: reloader.live is not None)
    totals = worker.run(stop, burst=args.burst)
    worker.progress.flush()
    reloader.stop()
    leave(client, settings.keys.requests, INFERENCE_GROUP, consumer)
    live = reloader.live
    log.info(
        "inference worker %s stopped: %d signals, %d error replies, %d unanswerable, "
        "%d batches, last version %s",
        consumer,
        totals.signals,
        totals.errors,
        totals.dead,
        totals.batches,
        None if live is None else live.version,
    )
    return 0


def leave(client: redis.Redis, stream: str, group: str, consumer: str) -> None:
    """On a clean stop, leave the consumer group unless entries are still pending for this
    consumer (they stay for a restart under the same name, or another worker's claim)."""
    try:
        outcome, pending = leave_group(client, stream, group, consumer)
    except redis.RedisError as error:
        log.warning("could not leave group %s as %s: %s", group, consumer, error)
        return
    if outcome == "pending":
        log.warning(
            "%s stays in group %s: %d entries are pending for it (a restart under this "
            "name resumes them; other workers claim them once idle)",
            consumer,
            group,
            pending,
        )
    elif outcome == "deleted":
        log.info("%s left group %s", consumer, group)
