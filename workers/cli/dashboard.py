"""`negcase dashboard`: one small live web page (server-sent events, no build step), the
deployment's Prometheus gauges at /metrics, and /healthz and /readyz for health checks."""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from negcase.cli.cluster_metrics import ClusterCollector
from negcase.cli.options import connection_options, logging_options, redis_client, settings_from
from negcase.cli.status import gather_status
from negcase.cli.tail import format_event, recent_events
from negcase.runtime.shutdown import StopFlag, install_signal_handlers
from negcase.store.connection import redacted
from negcase.store.health import HealthKey
from negcase.store.keys import Keys

PAGE = (Path(__file__).parent / "dashboard.html").read_bytes()
TRAINING_TYPES = {
    "training_started",
    "training_completed",
    "checkpoint_published",
    "checkpoint_loaded",
    "checkpoint_rejected",
    "canary_started",
    "promoted",
    "retired",
    "rollback",
    "deferred",
    "lease_expired",
    "case_dead",
}
RECENT_EVENTS = 1000

log = logging.getLogger("negcase.dashboard")


def snapshot(client: redis.Redis, keys: Keys, partitions: int = 1) -> dict[str, Any]:
    """Everything the page shows: the status, the newest cases, and the training log (of
    every partition)."""
    recent = recent_events(client, keys, RECENT_EVENTS, partitions)
    cases = [e.details for e in recent if e.type == "case_added"][:10]
    training = [
        {"time": time.strftime("%H:%M:%S", time.localtime(e.at_ms / 1000)), "line": format_event(e)}
        for e in recent
        if e.type in TRAINING_TYPES
    ][:15]
    status = gather_status(client, keys, partitions)
    return {"status": status, "recent_cases": cases, "training_log": training}


def make_handler(
    client: redis.Redis,
    keys: Keys,
    interval_s: float,
    stop: threading.Event,
    partitions: int = 1,
) -> type:
    """A request handler bound to one Redis client and namespace (of `partitions`)."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(client, keys, partitions))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE)
            elif path == "/snapshot.json":
                self._send(
                    HTTPStatus.OK,
                    "application/json",
                    orjson.dumps(snapshot(client, keys, partitions)),
                )
            elif path == "/events":
                self._stream()
            elif path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._send(HTTPStatus.OK, content_type, encoder(registry))
            elif path == "/healthz":
                self._send(HTTPStatus.OK, "text/plain", b"ok\n")
            elif path == "/readyz":
                self._readiness()
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _readiness(self) -> None:
            """Ready while Redis answers: the page and the gauges need it."""
            try:
                client.ping()
            except redis.RedisError as error:
                body = f"not ready: Redis does not answer ({error})\n".encode()
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", body)
                return
            self._send(HTTPStatus.OK, "text/plain", b"ready\n")

        def _stream(self) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while not stop.is_set():
                    try:
                        data = orjson.dumps(snapshot(client, keys, partitions))
                    except redis.RedisError as error:
                        # A comment line keeps the stream open while Redis is away.
                        data = None
                        self.wfile.write(f": redis unavailable: {error}\n\n".encode())
                    if data is not None:
                        self.wfile.write(b"data: " + data + b"\n\n")
                    self.wfile.flush()
                    stop.wait(interval_s)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def register(sub: argparse._SubParsersAction) -> None:
    """Add `negcase dashboard`."""
    parser = sub.add_parser(
        "dashboard",
        parents=[connection_options(), logging_options()],
        help="serve a live web page of the pipeline on localhost",
        description=(
            "Serve one page with the live numbers (trades, wins, losses, cases by priority, "
            "queue and leases, dead letters, checkpoints), a chart of the loss rate by model "
            "version, the newest cases with their lessons, and the training log. Updates "
            "arrive by server-sent events; /snapshot.json has the same data. /metrics has the "
            "deployment's Prometheus gauges (queue, lag, pending, served versions, loss rate "
            "per version), /healthz and /readyz answer health checks."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (8765; 0 picks one)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    parser.set_defaults(run=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    settings = settings_from(args)
    client = redis_client(settings)
    stop = threading.Event()
    handler = make_handler(client, settings.keys, args.interval, stop, settings.partitions)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    health = HealthKey(client, settings.keys, "dashboard", settings.health_ttl_s)
    print(f"dashboard on http://{args.host}:{server.server_address[1]}/", flush=True)
    log.info(
        "dashboard on port %d, namespace %s, Redis %s",
        server.server_address[1],
        settings.namespace,
        redacted(settings.redis_url or "redis://127.0.0.1:6379/0"),
    )
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    flag = StopFlag()
    install_signal_handlers(flag, "dashboard")
    while not flag.wait(1.0):
        with contextlib.suppress(redis.RedisError):
            health.refresh(port=server.server_address[1])
    stop.set()
    server.shutdown()
    with contextlib.suppress(redis.RedisError):
        health.clear()
    return 0
