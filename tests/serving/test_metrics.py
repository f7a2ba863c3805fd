"""Prometheus metrics: names, labels, units and the text exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from torchops.serving.metrics import ServingMetrics


def _families(metrics: ServingMetrics) -> dict[str, object]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _samples(metrics: ServingMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def test_requests_latency_queue_compute_batch() -> None:
    metrics = ServingMetrics()
    metrics.observe_request("mlp", 2, "ok", 0.0003)
    metrics.observe_request("mlp", 2, "ok", 0.002)
    metrics.observe_request("mlp", "2", "InvalidInput", 0.00004)
    metrics.observe_queue("mlp", 2, 0.00007)
    metrics.observe_compute("mlp", 2, 0.0015, batch_size=12)
    families = _families(metrics)
    assert families["torchops_requests"].type == "counter"  # type: ignore[attr-defined]
    for name in (
        "torchops_request_duration_seconds",
        "torchops_queue_duration_seconds",
        "torchops_compute_duration_seconds",
        "torchops_batch_size",
    ):
        assert families[name].type == "histogram"  # type: ignore[attr-defined]
    samples = _samples(metrics)
    assert samples[_key("torchops_requests_total", model="mlp", version="2", outcome="ok")] == 2
    invalid = _key("torchops_requests_total", model="mlp", version="2", outcome="InvalidInput")
    assert samples[invalid] == 1
    labels = {"model": "mlp", "version": "2"}
    assert samples[_key("torchops_request_duration_seconds_count", **labels)] == 3
    assert abs(samples[_key("torchops_request_duration_seconds_sum", **labels)] - 0.00234) < 1e-9
    # sub-millisecond buckets resolve small latencies
    bucket = "torchops_request_duration_seconds_bucket"
    assert samples[_key(bucket, le="5e-05", **labels)] == 1
    assert samples[_key(bucket, le="0.0005", **labels)] == 2
    assert samples[_key(bucket, le="+Inf", **labels)] == 3
    assert samples[_key("torchops_queue_duration_seconds_bucket", le="0.0001", **labels)] == 1
    assert samples[_key("torchops_compute_duration_seconds_sum", **labels)] == 0.0015
    assert samples[_key("torchops_batch_size_bucket", le="8.0", **labels)] == 0
    assert samples[_key("torchops_batch_size_bucket", le="16.0", **labels)] == 1
    assert samples[_key("torchops_batch_size_sum", **labels)] == 12


def test_loaded_versions_and_inflight() -> None:
    metrics = ServingMetrics()
    metrics.set_loaded("mlp", 1, True)
    metrics.set_loaded("mlp", 2, True)
    metrics.set_loaded("mlp", 1, False)
    metrics.inflight("mlp", 2, 1)
    metrics.inflight("mlp", 2, 1)
    metrics.inflight("mlp", 2, -1)
    families = _families(metrics)
    assert families["torchops_loaded_versions"].type == "gauge"  # type: ignore[attr-defined]
    samples = _samples(metrics)
    assert samples[_key("torchops_loaded_versions", model="mlp", version="1")] == 0
    assert samples[_key("torchops_loaded_versions", model="mlp", version="2")] == 1
    assert samples[_key("torchops_inflight_requests", model="mlp", version="2")] == 1


def test_each_instance_has_its_own_registry() -> None:
    first, second = ServingMetrics(), ServingMetrics()
    first.observe_request("a", 1, "ok", 0.1)
    assert _key("torchops_requests_total", model="a", version="1", outcome="ok") not in (
        _samples(second)
    )
    shared = CollectorRegistry()
    metrics = ServingMetrics(shared)
    metrics.set_loaded("a", 1, True)
    value = shared.get_sample_value("torchops_loaded_versions", {"model": "a", "version": "1"})
    assert value == 1
