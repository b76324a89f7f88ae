"""Prometheus metrics: each worker kind's counters, served on --metrics-port when given."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


def serve(registry: CollectorRegistry, port: int | None) -> None:
    """Expose `registry` on http://0.0.0.0:<port>/metrics from a daemon thread (if a port)."""
    if port:
        start_http_server(port, registry=registry)


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
