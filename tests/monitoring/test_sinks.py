from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchops.monitoring.drift import DriftReport, FeatureDrift
from torchops.monitoring.observations import ObservationWriter
from torchops.monitoring.sinks import PrometheusSink, TensorBoardSink

from .conftest import MakeObservation

QUALITY = {
    "count": 120.0,
    "accuracy": 0.75,
    "precision_macro": 0.7,
    "recall_macro": 0.65,
    "f1_macro": 0.6,
    "log_loss": 0.5,
    "precision[cat]": 0.9,
    "f1[cat]": 0.8,
}


def _drift(psi0: float = 0.3) -> DriftReport:
    features = (
        FeatureDrift("x[0]", psi=psi0, js=0.2, p_value=None, method="psi", drifted=psi0 > 0.2),
        FeatureDrift("x[1]", psi=0.01, js=0.02, p_value=None, method="psi", drifted=False),
    )
    prediction = FeatureDrift("prediction", 0.05, 0.03, None, "psi", False)
    drifted = sum(f.drifted for f in features) / len(features)
    return DriftReport(
        rows=2000,
        features=features,
        drifted_share=drifted,
        dataset_drifted=drifted >= 0.5,
        prediction=prediction,
    )


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_gauges_parse_back(make_observation: MakeObservation, engine: Engine) -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    sink.write("clf", 3, QUALITY, _drift())
    sink.write("reg", 1, {"mse": 4.0, "rmse": 2.0, "mae": 1.5, "count": 9.0}, None)
    samples = _samples(registry)
    v3 = (("model", "clf"), ("version", "3"))
    assert samples[("torchops_model_accuracy", v3)] == 0.75
    assert samples[("torchops_model_precision", v3)] == 0.7
    assert samples[("torchops_model_recall", v3)] == 0.65
    assert samples[("torchops_model_f1", v3)] == 0.6
    assert samples[("torchops_model_log_loss", v3)] == 0.5
    assert samples[("torchops_model_labelled_observations", v3)] == 120
    assert samples[("torchops_model_class_f1", (("class", "cat"), *v3))] == 0.8
    feature0 = (("feature", "x[0]"), *v3)
    assert samples[("torchops_feature_drift_psi", feature0)] == 0.3
    assert samples[("torchops_feature_drift_js", feature0)] == 0.2
    assert samples[("torchops_feature_drifted", feature0)] == 1
    assert samples[("torchops_feature_drifted", (("feature", "x[1]"), *v3))] == 0
    assert samples[("torchops_dataset_drift_share", v3)] == 0.5
    assert samples[("torchops_dataset_drift", v3)] == 1
    assert samples[("torchops_prediction_drift_psi", v3)] == 0.05
    reg = (("model", "reg"), ("version", "1"))
    assert samples[("torchops_model_rmse", reg)] == 2.0
    assert samples[("torchops_model_mae", reg)] == 1.5
    assert ("torchops_model_accuracy", reg) not in samples

    # a later window overwrites; a retired version's series disappear
    sink.write("clf", 3, {"accuracy": 0.5}, _drift(psi0=0.1))
    samples = _samples(registry)
    assert samples[("torchops_model_accuracy", v3)] == 0.5
    assert samples[("torchops_dataset_drift", v3)] == 0
    sink.remove("clf", 3)
    assert not any(dict(labels).get("model") == "clf" for _, labels in _samples(registry))


def test_dropped_observations_counter_is_fed_by_the_writer(
    engine: Engine, make_observation: MakeObservation
) -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    writer = ObservationWriter(engine, max_buffer=2, on_drop=sink.dropped)
    for i in range(5):
        writer.put(make_observation("clf", f"r{i}"))
    assert _samples(registry)[("torchops_observations_dropped_total", (("model", "clf"),))] == 3


def test_the_writers_counts_are_read_when_prometheus_scrapes(
    engine: Engine, make_observation: MakeObservation
) -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    writer = ObservationWriter(
        engine, max_buffer=10, max_buffer_bytes=1 << 20, on_drop=sink.dropped
    )  # not started: the rows wait until flushed
    sink.follow(writer)
    for i in range(12):
        writer.put(make_observation("clf", f"r{i}"))
    samples = _samples(registry)
    assert samples[("torchops_observations_buffered", ())] == 10
    assert samples[("torchops_observations_buffered_bytes", ())] == writer.buffered_bytes > 0
    assert samples[("torchops_observations_buffer_capacity", ())] == 10
    assert samples[("torchops_observations_buffer_capacity_bytes", ())] == 1 << 20
    assert samples[("torchops_observations_written_total", ())] == 0
    assert samples[("torchops_observations_dropped_total", (("model", "clf"),))] == 2
    writer.flush()
    samples = _samples(registry)
    assert samples[("torchops_observations_written_total", ())] == 10
    assert samples[("torchops_observations_buffered", ())] == 0
    assert samples[("torchops_observations_buffered_bytes", ())] == 0


def test_tensorboard_event_files_read_back(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    rng = np.random.default_rng(0)
    for step in range(3):
        quality = {"accuracy": 0.9 - 0.1 * step, "f1[cat]": 0.5, "log_loss": float("nan")}
        sink.write(
            "clf",
            2,
            step,
            quality,
            _drift(psi0=0.1 * step),
            inputs=rng.normal(size=(50, 4)),
            outputs=rng.random((50, 3)),
        )
    sink.write("clf", 3, 0, {"accuracy": 1.0}, None)
    sink.close()

    # size guidance 0 keeps every event (the default samples histograms down to one)
    accumulator = EventAccumulator(
        str(tmp_path / "tb" / "clf" / "2"), size_guidance={"scalars": 0, "histograms": 0}
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"quality/accuracy", "quality/f1_cat", "drift/x_0_psi", "drift/x_1_js"} <= set(
        tags["scalars"]
    )
    assert {"drift/share", "drift/prediction_psi"} <= set(tags["scalars"])
    assert "quality/log_loss" not in tags["scalars"]  # NaN is not logged
    accuracy = accumulator.Scalars("quality/accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2]
    assert [e.value for e in accuracy] == pytest.approx([0.9, 0.8, 0.7])
    assert [e.value for e in accumulator.Scalars("drift/x_0_psi")] == pytest.approx([0, 0.1, 0.2])
    assert set(tags["histograms"]) == {"inputs", "outputs"}
    inputs = accumulator.Histograms("inputs")
    assert [h.step for h in inputs] == [0, 1, 2]
    assert inputs[0].histogram_value.num == 200
    assert accumulator.Histograms("outputs")[0].histogram_value.min >= 0.0

    other = EventAccumulator(str(tmp_path / "tb" / "clf" / "3"))
    other.Reload()
    assert [e.value for e in other.Scalars("quality/accuracy")] == [1.0]
