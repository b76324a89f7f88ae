"""Prometheus metrics: each worker kind's counters, served on --metrics-port when given, with
/healthz (the process answers) and /readyz (it can do its job: an inference worker only once
it serves a model) beside /metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder


def always_ready() -> bool:
    """Readiness of a worker that can work as soon as it runs (detectors, trainers)."""
    return True


def serve(
    registry: CollectorRegistry, port: int | None, ready: Callable[[], bool] = always_ready
) -> ThreadingHTTPServer | None:
    """Serve http://0.0.0.0:<port>/metrics, /healthz and /readyz from a daemon thread (if a
    port); the server, so a caller can shut it down."""
    if not port:
        return None
    server = ThreadingHTTPServer(("0.0.0.0", port), metrics_handler(registry, ready))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def metrics_handler(registry: CollectorRegistry, ready: Callable[[], bool]) -> type:
    """A request handler for /metrics, /healthz and /readyz."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._send(HTTPStatus.OK, content_type, encoder(registry))
            elif path == "/healthz":
                self._send(HTTPStatus.OK, "text/plain", b"ok\n")
            elif path == "/readyz":
                is_ready = ready()
                status = HTTPStatus.OK if is_ready else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, "text/plain", b"ready\n" if is_ready else b"not ready\n")
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not news

    return Handler


@dataclass
class DetectorMetrics:
    """What a loss detector counts."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.entries = Counter("negcase_detector_entries", "Trade entries handled", registry=r)
        self.cases = Counter("negcase_detector_cases_added", "New negative cases", registry=r)
        self.duplicates = Counter("negcase_detector_duplicates", "Duplicate trades", registry=r)
        self.dead = Counter("negcase_detector_dead_lettered", "Entries dead-lettered", registry=r)
        self.batch_seconds = Histogram(
            "negcase_detector_store_seconds", "Archive + record time per batch", registry=r
        )


@dataclass
class TrainerMetrics:
    """What a training worker counts."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sessions = Counter(
            "negcase_trainer_sessions", "Training sessions", ["outcome"], registry=r
        )
        self.session_seconds = Histogram(
            "negcase_trainer_session_seconds", "Wall time of a training session", registry=r
        )
        self.epochs = Counter("negcase_trainer_epochs", "Epochs trained", registry=r)


@dataclass
class InferenceMetrics:
    """What an inference worker counts."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "negcase_inference_requests", "Signal requests answered", ["result"], registry=r
        )
        self.batch_seconds = Histogram(
            "negcase_inference_batch_seconds", "Forward pass + reply time per batch", registry=r
        )
        self.model_version = Gauge("negcase_inference_model_version", "Version served", registry=r)
