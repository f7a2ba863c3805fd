"""Per-version statistics (``GET /v2/models/{m}/stats``) in the shape Triton answers.

Read from the server's Prometheus metrics, so the numbers agree with ``/metrics``.
"""

from __future__ import annotations

from typing import Any

from torchops.serving.metrics import ServingMetrics

__all__ = ["model_stats"]

_NS = 1e9


def _value(metrics: ServingMetrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def _requests(metrics: ServingMetrics, labels: dict[str, str]) -> dict[str, float]:
    """Request count by outcome for one model version."""
    counts: dict[str, float] = {}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if sample.labels.get("model") != labels["model"]:
                continue
            if sample.labels.get("version") != labels["version"]:
                continue
            counts[sample.labels["outcome"]] = sample.value
    return counts


def model_stats(metrics: ServingMetrics, model: str, version: int) -> dict[str, Any]:
    """Counts and cumulative times (ns) of one version since it was first loaded."""
    labels = {"model": model, "version": str(version)}
    counts = _requests(metrics, labels)
    success = int(counts.get("ok", 0))
    failed = int(sum(v for k, v in counts.items() if k != "ok"))
    total_ns = _value(metrics, "torchops_request_duration_seconds_sum", labels) * _NS
    queue_ns = _value(metrics, "torchops_queue_duration_seconds_sum", labels) * _NS
    queue_count = _value(metrics, "torchops_queue_duration_seconds_count", labels)
    compute_ns = _value(metrics, "torchops_compute_duration_seconds_sum", labels) * _NS
    executions = _value(metrics, "torchops_batch_size_count", labels)
    rows = _value(metrics, "torchops_batch_size_sum", labels)
    # the request-duration histogram mixes successes and failures; split it by count
    answered = success + failed
    success_ns = total_ns * success / answered if answered else 0.0
    return {
        "name": model,
        "version": str(version),
        "inference_count": int(rows),
        "execution_count": int(executions),
        "inference_stats": {
            "success": {"count": success, "ns": int(success_ns)},
            "fail": {"count": failed, "ns": int(total_ns - success_ns)},
            "queue": {"count": int(queue_count), "ns": int(queue_ns)},
            "compute_infer": {"count": int(executions), "ns": int(compute_ns)},
        },
        "mean_batch_size": rows / executions if executions else 0.0,
    }
