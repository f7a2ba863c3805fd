"""Where live quality and drift go: Prometheus gauges and TensorBoard event files.

Both sinks have the same verb, ``write(model, version, ..., quality, drift)``: quality is
the mapping of a ``ClassificationQuality`` / ``RegressionQuality`` (``accuracy``,
``f1_macro``, ``rmse``, ``count``, ``f1[<label>]`` ...), drift a ``DriftReport`` or None.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from torchops.refs import validate_name
from torchops.types import Array

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from torchops.monitoring.drift import DriftReport
    from torchops.monitoring.observations import ObservationWriter

__all__ = ["PrometheusSink", "TensorBoardSink", "WriterCollector"]

_LABELS = ("model", "version")
#: quality key -> gauge name (ratios are unitless, errors in the target's unit)
_QUALITY_GAUGES = {
    "accuracy": ("torchops_model_accuracy", "Share of labelled predictions that were right."),
    "precision_macro": ("torchops_model_precision", "Macro-averaged precision."),
    "recall_macro": ("torchops_model_recall", "Macro-averaged recall."),
    "f1_macro": ("torchops_model_f1", "Macro-averaged F1 score."),
    "log_loss": ("torchops_model_log_loss", "Mean log loss of the predicted probabilities."),
    "mse": ("torchops_model_mse", "Mean squared error on labelled predictions."),
    "rmse": ("torchops_model_rmse", "Root mean squared error on labelled predictions."),
    "mae": ("torchops_model_mae", "Mean absolute error on labelled predictions."),
    "count": (
        "torchops_model_labelled_observations",
        "Labelled predictions the quality metrics cover.",
    ),
}
#: per-class keys such as ``f1[cat]``
_PER_CLASS = re.compile(r"^(precision|recall|f1)\[(.*)\]$")


class PrometheusSink:
    """Gauges of live quality and drift per model version in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        # (gauge, label values) set per (model, version), so ``remove`` can retire them
        self._series: dict[tuple[str, str], set[tuple[Gauge, tuple[str, ...]]]] = {}
        self._quality = {
            key: Gauge(name, doc, _LABELS, registry=registry)
            for key, (name, doc) in _QUALITY_GAUGES.items()
        }
        self._per_class = {
            kind: Gauge(
                f"torchops_model_class_{kind}",
                f"Per-class {kind} on labelled predictions.",
                (*_LABELS, "class"),
                registry=registry,
            )
            for kind in ("precision", "recall", "f1")
        }
        feature = (*_LABELS, "feature")
        self.feature_psi = Gauge(
            "torchops_feature_drift_psi",
            "Population stability index of a feature against the reference profile.",
            feature,
            registry=registry,
        )
        self.feature_js = Gauge(
            "torchops_feature_drift_js",
            "Jensen-Shannon distance (base 2) of a feature against the reference profile.",
            feature,
            registry=registry,
        )
        self.feature_drifted = Gauge(
            "torchops_feature_drifted",
            "1 when the feature drifted in the latest window, else 0.",
            feature,
            registry=registry,
        )
        self.drift_share = Gauge(
            "torchops_dataset_drift_share",
            "Share of features that drifted in the latest window.",
            _LABELS,
            registry=registry,
        )
        self.dataset_drift = Gauge(
            "torchops_dataset_drift",
            "1 when the dataset drifted in the latest window, else 0.",
            _LABELS,
            registry=registry,
        )
        self.prediction_psi = Gauge(
            "torchops_prediction_drift_psi",
            "Population stability index of the predictions against the reference.",
            _LABELS,
            registry=registry,
        )
        self.drift_rows = Gauge(
            "torchops_drift_window_rows",
            "Rows in the latest drift window.",
            _LABELS,
            registry=registry,
        )
        self.observations_dropped = Counter(
            "torchops_observations_dropped",
            "Observations dropped instead of stored (buffer full or write failed).",
            ("model",),
            registry=registry,
        )

    def write(
        self,
        model: str,
        version: int,
        quality: Mapping[str, float],
        drift: DriftReport | None,
    ) -> None:
        """Set the gauges of ``model`` ``version`` from its latest quality and drift."""
        labels = (validate_name(model), str(version))
        for key, value in quality.items():
            gauge = self._quality.get(key)
            if gauge is not None:
                self._set(gauge, labels, value)
                continue
            match = _PER_CLASS.match(key)
            if match is not None:
                self._set(self._per_class[match[1]], (*labels, match[2]), value)
        if drift is None:
            return
        for feature in drift.features:
            self._set(self.feature_psi, (*labels, feature.name), feature.psi)
            self._set(self.feature_js, (*labels, feature.name), feature.js)
            self._set(self.feature_drifted, (*labels, feature.name), float(feature.drifted))
        self._set(self.drift_share, labels, drift.drifted_share)
        self._set(self.dataset_drift, labels, float(drift.dataset_drifted))
        self._set(self.drift_rows, labels, float(drift.rows))
        if drift.prediction is not None:
            self._set(self.prediction_psi, labels, drift.prediction.psi)

    def dropped(self, model: str, count: int) -> None:
        """Count dropped observations: pass as ``ObservationWriter(on_drop=sink.dropped)``."""
        self.observations_dropped.labels(model).inc(count)

    def follow(self, writer: ObservationWriter) -> None:
        """Expose ``writer``'s counts (``WriterCollector``) with the gauges."""
        self.registry.register(WriterCollector(writer))

    def remove(self, model: str, version: int) -> None:
        """Forget every series of a version that is no longer served."""
        with self._lock:
            series = self._series.pop((model, str(version)), set())
        for gauge, labels in series:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def _set(self, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        gauge.labels(*labels).set(float(value))
        with self._lock:
            self._series.setdefault((labels[0], labels[1]), set()).add((gauge, labels))


class WriterCollector(Collector):
    """An ``ObservationWriter``'s counts, read when Prometheus scrapes (nothing is counted
    on the request path): observations stored, observations and array bytes waiting in
    the buffer, and the buffer's bounds — past them, observations are dropped
    (``torchops_observations_dropped_total``)."""

    def __init__(self, writer: ObservationWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Metric]:
        writer = self.writer
        yield CounterMetricFamily(
            "torchops_observations_written",
            "Observations this process has stored in the metadata store.",
            value=writer.written,
        )
        for name, doc, value in (
            ("buffered", "Observations waiting to be stored.", writer.buffered),
            ("buffered_bytes", "Bytes of arrays waiting to be stored.", writer.buffered_bytes),
            ("buffer_capacity", "Observations the buffer holds at most.", writer.max_buffer),
            (
                "buffer_capacity_bytes",
                "Bytes of arrays the buffer holds at most.",
                writer.max_buffer_bytes,
            ),
        ):
            yield GaugeMetricFamily(f"torchops_observations_{name}", doc, value=value)


class TensorBoardSink:
    """Event files under ``root/<model>/<version>``, readable by TensorBoard.

    Scalars ``quality/<metric>``, ``drift/<feature>_psi``, ``drift/<feature>_js``,
    ``drift/share`` and ``drift/prediction_psi``; histograms ``inputs`` and ``outputs``.
    Characters TensorBoard does not allow in a tag become ``_`` (``f1[cat]`` → ``f1_cat``).
    """

    def __init__(self, root: str | Path) -> None:
        # TensorBoard's writer takes a good part of a second of CPU to import: pay it when
        # the sink is made (a server starting), not at the first write under traffic
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self.root = Path(root)
        self._summary_writer = SummaryWriter
        self._summary = Summary
        self._value = Summary.Value
        self._writers: dict[tuple[str, int], SummaryWriter] = {}
        self._lock = threading.Lock()

    def write(
        self,
        model: str,
        version: int,
        step: int,
        quality: Mapping[str, float],
        drift: DriftReport | None,
        inputs: Array | None = None,
        outputs: Array | None = None,
    ) -> None:
        """Log one step of a version's quality, drift and input/output distributions. The
        step's scalars go in one event (one ``Summary`` of many values, which TensorBoard
        reads as it reads one each), not one event per scalar: 130 of them for 64
        features."""
        writer = self._writer(model, version)
        scalars: list[tuple[str, float]] = [
            (f"quality/{_tag(key)}", float(value))
            for key, value in quality.items()
            if _finite(value)
        ]
        if drift is not None:
            for feature in drift.features:
                name = _tag(feature.name)
                if _finite(feature.psi):
                    scalars.append((f"drift/{name}_psi", feature.psi))
                if _finite(feature.js):
                    scalars.append((f"drift/{name}_js", feature.js))
            scalars.append(("drift/share", drift.drifted_share))
            if drift.prediction is not None and _finite(drift.prediction.psi):
                scalars.append(("drift/prediction_psi", drift.prediction.psi))
        if scalars:
            summary = self._summary(value=[self._value(tag=t, simple_value=v) for t, v in scalars])
            # the event file SummaryWriter.add_scalar writes to (untyped in torch)
            writer._get_file_writer().add_summary(summary, step)  # type: ignore[no-untyped-call]
        for tag, values in (("inputs", inputs), ("outputs", outputs)):
            if values is not None:
                flat = np.asarray(values, dtype=np.float64).ravel()
                flat = flat[np.isfinite(flat)]
                if flat.size:
                    writer.add_histogram(tag, flat, step)
        writer.flush()

    def close(self) -> None:
        """Flush and close every event file."""
        with self._lock:
            writers, self._writers = list(self._writers.values()), {}
        for writer in writers:
            writer.close()

    def _writer(self, model: str, version: int) -> SummaryWriter:
        key = (validate_name(model), int(version))
        with self._lock:
            writer = self._writers.get(key)
            if writer is None:
                log_dir = self.root / model / str(version)
                writer = self._summary_writer(log_dir=str(log_dir))
                self._writers[key] = writer
            return writer


def _tag(name: str) -> str:
    return re.sub(r"[^-/\w.]", "_", name.replace("]", "").replace("[", "_"))


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
