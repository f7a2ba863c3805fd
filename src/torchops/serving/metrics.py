"""Prometheus metrics of the inference server, in base units, labelled by model and version.

Each ``ServingMetrics`` owns a ``CollectorRegistry`` (unless given one), so several apps in
one process, and tests, never collide. Labelled children are cached: an observation on the
hot path is a dict lookup and the client library's own update.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "ServingMetrics"]

#: seconds, from 50 µs to 10 s
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: rows per batch run by the model
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_LABELS = ("model", "version")


class ServingMetrics:
    """Request counts and latencies, queue and compute times, batch sizes, loaded versions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "torchops_requests",
            "Inference requests answered, by outcome (ok or the error class).",
            (*_LABELS, "outcome"),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "torchops_request_duration_seconds",
            "Time from receiving an inference request to answering it.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "torchops_queue_duration_seconds",
            "Time a request waited in the batch queue before its batch started.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_duration = Histogram(
            "torchops_compute_duration_seconds",
            "Time the model took to run one batch.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "torchops_batch_size",
            "Rows per batch run by the model.",
            _LABELS,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.loaded_versions = Gauge(
            "torchops_loaded_versions",
            "1 while a model version is loaded and serving, else 0.",
            _LABELS,
            registry=self.registry,
        )
        self.inflight_requests = Gauge(
            "torchops_inflight_requests",
            "Inference requests received and not yet answered.",
            _LABELS,
            registry=self.registry,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def observe_request(self, model: str, version: int | str, outcome: str, seconds: float) -> None:
        """Count one answered request and record its latency."""
        v = str(version)
        self._child(self.requests, model, v, outcome).inc()
        self._child(self.request_duration, model, v).observe(seconds)

    def observe_queue(self, model: str, version: int | str, seconds: float) -> None:
        self._child(self.queue_duration, model, str(version)).observe(seconds)

    def observe_compute(
        self, model: str, version: int | str, seconds: float, batch_size: int
    ) -> None:
        """Record one batch run: its compute time and its number of rows."""
        v = str(version)
        self._child(self.compute_duration, model, v).observe(seconds)
        self._child(self.batch_size, model, v).observe(batch_size)

    def set_loaded(self, model: str, version: int | str, loaded: bool) -> None:
        self._child(self.loaded_versions, model, str(version)).set(1 if loaded else 0)

    def inflight(self, model: str, version: int | str, delta: int) -> None:
        self._child(self.inflight_requests, model, str(version)).inc(delta)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
