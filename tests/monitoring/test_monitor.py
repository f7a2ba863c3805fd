"""The Monitor on its own: a real registry, real runtimes, real digits and real sinks."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, f1_score, log_loss, mean_squared_error
from sklearn.model_selection import train_test_split
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchops.errors import Conflict, InvalidInput, NotFound
from torchops.monitoring.alerts import AlertRule
from torchops.monitoring.monitor import Monitor, MonitorOptions
from torchops.registry import Registry
from torchops.runtime import Runtime
from torchops.types import Array, ModelVersion

LABELS = [str(i) for i in range(10)]


@cache
def _digits() -> tuple[Array, Array, Array, Array, dict[str, torch.Tensor]]:
    """Digits scaled to [0, 1], split, and the weights of a linear classifier fitted on them."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(150):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return x_train, y_train, x_test, y_test, model.state_dict()


class _Net(torch.nn.Module):
    """The fitted linear classifier: logits, or class probabilities with ``softmax``."""

    def __init__(self, softmax: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)
        self.linear.load_state_dict(_digits()[4])
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        return torch.softmax(logits, dim=1) if self.softmax else logits


class _Linear(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


def _classifier(softmax: bool = False) -> torch.nn.Module:
    return _Net(softmax).eval()


@pytest.fixture
def digits(registry: Registry) -> ModelVersion:
    """``digits`` v1: 64 pixels in, 10 logits out, registered with a reference sample."""
    x_train = _digits()[0]
    return registry.register(
        "digits",
        _classifier(),
        torch.from_numpy(x_train[:2]),
        formats=("torchscript",),
        labels=LABELS,
        reference=x_train,
    )


@pytest.fixture
def runtime(registry: Registry, digits: ModelVersion) -> Iterator[Runtime]:
    rt = registry.load("digits:1")
    yield rt
    rt.close()


def _options(**changes: Any) -> MonitorOptions:
    base: dict[str, Any] = {"quality_window": 100, "drift_window": 200, "poll_interval_s": 3600.0}
    return MonitorOptions(**{**base, **changes})


@pytest.fixture
def monitor(registry: Registry) -> Iterator[Monitor]:
    mon = Monitor(registry, options=_options(), metrics_registry=CollectorRegistry(), seed=0)
    yield mon
    mon.close()


def _serve(mon: Monitor, rt: Runtime, x: Array, prefix: str, *, rows: int = 1) -> list[str]:
    """Predict ``x`` in requests of ``rows`` rows and record them; the observation ids."""
    ids: list[str] = []
    for start in range(0, len(x), rows):
        batch = {"x": x[start : start + rows]}
        outputs = rt.predict_batch(batch)
        rid = f"{prefix}-{start}"
        mon.record("digits", 1, rt.signature, rid, 0.001, batch, outputs)
        n = len(batch["x"])
        ids.extend([rid] if n == 1 else [f"{rid}/{i}" for i in range(n)])
    return ids


def _softmax(logits: Array) -> Array:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def test_live_quality_matches_sklearn(monitor: Monitor, runtime: Runtime) -> None:
    _, _, x_test, y_test, _ = _digits()
    ids = _serve(monitor, runtime, x_test, "q", rows=5)
    result = monitor.add_feedback_many("digits", list(zip(ids, y_test.tolist(), strict=True)))
    assert result.accepted == len(ids) and not result.errors
    monitor.writer.flush()
    monitor.refresh()
    live = monitor.quality("digits")
    logits = runtime.predict_batch({"x": x_test})["output"]
    predicted = logits.argmax(axis=1)
    cumulative = live["windows"]["cumulative"]
    assert cumulative["count"] == len(y_test)
    assert cumulative["accuracy"] == pytest.approx(accuracy_score(y_test, predicted))
    assert cumulative["f1_macro"] == pytest.approx(f1_score(y_test, predicted, average="macro"))
    # the logits were turned into probabilities with a softmax
    expected_loss = log_loss(y_test, _softmax(logits.astype(np.float64)), labels=range(10))
    assert cumulative["log_loss"] == pytest.approx(expected_loss, rel=1e-4)
    last = live["windows"]["last_n"]
    assert last["count"] == 100
    assert last["accuracy"] == pytest.approx(accuracy_score(y_test[-100:], predicted[-100:]))
    assert live["windows"]["last_t"]["count"] == len(y_test)
    assert np.asarray(cumulative["confusion"]).sum() == len(y_test)


def test_probability_outputs_are_kept_and_rows_get_their_own_ids(
    registry: Registry, monitor: Monitor
) -> None:
    x_train, _, x_test, y_test, _ = _digits()
    registry.register(
        "soft", _classifier(softmax=True), torch.from_numpy(x_train[:2]), labels=LABELS
    )
    rt = registry.load("soft:1")
    batch = {"x": x_test[:3]}
    outputs = rt.predict_batch(batch)
    monitor.record("soft", 1, rt.signature, "r", 0.002, batch, outputs)
    pending = [monitor.writer.pending("soft", f"r/{i}") for i in range(3)]
    assert all(p is not None for p in pending)
    first = pending[0]
    assert first is not None and first.request_id == "r/0"
    np.testing.assert_allclose(first.proba or [], outputs["output"][0], rtol=1e-6)
    assert first.prediction == int(outputs["output"][0].argmax())
    assert monitor.writer.pending("soft", "r") is None
    # one list target for the request labels its three rows; the wrong length is refused
    with pytest.raises(InvalidInput):
        monitor.add_feedback("soft", "r", [1, 2])
    with pytest.raises(InvalidInput):
        monitor.add_feedback("soft", "r", 3)
    assert monitor.add_feedback("soft", "r", y_test[:3].tolist()).accepted == 3
    with pytest.raises(Conflict):
        monitor.add_feedback("soft", "r", y_test[:3].tolist())
    with pytest.raises(NotFound):
        monitor.add_feedback("soft", "nope", 1)
    rt.close()


def test_regression_quality(registry: Registry, monitor: Monitor) -> None:
    registry.register("reg", _Linear(4, 2), torch.zeros(2, 4), task="regression")
    rt = registry.load("reg:1")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    truth = rng.normal(size=(40, 2))
    for i in range(40):
        batch = {"x": x[i : i + 1]}
        monitor.record("reg", 1, rt.signature, f"r{i}", 0.001, batch, rt.predict_batch(batch))
    result = monitor.add_feedback_many("reg", [(f"r{i}", truth[i].tolist()) for i in range(40)])
    assert result.accepted == 40
    monitor.writer.flush()
    monitor.refresh()
    live = monitor.quality("reg", 1)
    predicted = rt.predict_batch({"x": x})["output"]
    expected = mean_squared_error(truth, predicted)
    assert live["windows"]["cumulative"]["mse"] == pytest.approx(expected, rel=1e-5)
    assert live["drift"] is None  # registered without a reference sample: no profile
    rt.close()


def test_drift_flags_inverted_digits_not_clean_ones(monitor: Monitor, runtime: Runtime) -> None:
    _, _, x_test, _, _ = _digits()
    _serve(monitor, runtime, x_test[:200], "clean", rows=10)
    monitor.writer.flush()
    monitor.refresh()
    clean = monitor.quality("digits")["drift"]
    assert clean is not None and clean["rows"] == 200
    assert not clean["dataset_drifted"]
    _serve(monitor, runtime, 1.0 - x_test[200:400], "shifted", rows=10)
    monitor.writer.flush()
    monitor.refresh()
    shifted = monitor.quality("digits")["drift"]
    assert shifted is not None and shifted["dataset_drifted"]
    drifted = {f["name"] for f in shifted["features"] if f["drifted"]}
    assert "x[0]" in drifted  # a pixel always blank in the reference, always lit inverted
    assert shifted["drifted_share"] > 0.5


def test_publish_writes_prometheus_tensorboard_snapshots(
    registry: Registry, runtime: Runtime, tmp_path: Path
) -> None:
    metrics = CollectorRegistry()
    mon = Monitor(registry, options=_options(), metrics_registry=metrics)
    _, _, x_test, y_test, _ = _digits()
    ids = _serve(mon, runtime, x_test[:250], "p", rows=25)
    mon.add_feedback_many("digits", list(zip(ids, y_test[:250].tolist(), strict=True)))
    mon.writer.flush()
    mon.refresh()
    mon.publish()
    labels = {"model": "digits", "version": "1"}
    accuracy = metrics.get_sample_value("torchops_model_accuracy", labels)
    assert accuracy == pytest.approx(mon.quality("digits")["windows"]["last_n"]["accuracy"])
    psi = metrics.get_sample_value("torchops_feature_drift_psi", {**labels, "feature": "x[10]"})
    assert psi is not None and psi >= 0.0
    kinds = {(s.kind, s.window) for s in mon.snapshots.history("digits", 1)}
    assert kinds == {
        ("quality", "cumulative"),
        ("quality", "last_100"),
        ("quality", "last_3600s"),
        ("drift", "last_200"),
    }
    mon.publish()  # nothing new: no new snapshot
    assert len(mon.snapshots.history("digits", 1)) == 4
    mon.close()
    events = EventAccumulator(str(registry.settings.tensorboard_dir / "digits" / "1"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "quality/last_n/accuracy" in scalars and "drift/share" in scalars
    assert events.Scalars("quality/cumulative/count")[-1].value == 250
    assert {"inputs", "outputs"} <= set(events.Tags()["histograms"])


def test_monitoring_leaves_no_arrays_in_reference_cycles(
    monitor: Monitor, runtime: Runtime
) -> None:
    """The server collects the GC's young generation only after 50,000 objects: arrays
    or bytes caught in reference cycles would wait that long."""
    _, _, x_test, y_test, _ = _digits()

    def traffic(rows: slice, prefix: str) -> None:
        ids = _serve(monitor, runtime, x_test[rows], prefix, rows=5)
        monitor.add_feedback_many("digits", list(zip(ids, y_test[rows].tolist(), strict=True)))
        monitor.writer.flush()
        monitor.refresh()
        monitor.publish()

    traffic(slice(0, 100), "warm")  # first use: imports, caches
    gc.collect()
    gc.disable()
    try:
        traffic(slice(100, 400), "live")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = [
            type(r).__name__
            for o in gc.garbage
            for r in gc.get_referents(o)
            if isinstance(r, np.ndarray | bytes | bytearray) and memoryview(r).nbytes >= 1024
        ]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert held == []


class _Receiver(BaseHTTPRequestHandler):
    events: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.events.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    events: list[dict[str, Any]] = []
    handler = type("Handler", (_Receiver,), {"events": events})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", events
    server.shutdown()
    server.server_close()


def test_alerts_fire_and_resolve_on_their_window(
    registry: Registry, runtime: Runtime, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    options = _options(webhook_url=url, drift_window=100)
    mon = Monitor(registry, options=options, metrics_registry=CollectorRegistry())
    mon.alerts.add_rule(AlertRule("digits", "low", "accuracy", "<", 0.5, window=50, min_samples=50))
    mon.alerts.add_rule(AlertRule("digits", "drift", "drift_share", ">=", 0.5, min_samples=50))
    _, _, x_test, y_test, _ = _digits()

    def label(x: Array, y: Array, prefix: str) -> None:
        ids = _serve(mon, runtime, x, prefix, rows=10)
        assert mon.add_feedback_many("digits", list(zip(ids, y.tolist(), strict=True))).accepted
        mon.writer.flush()
        mon.refresh()
        mon.publish()

    label(x_test[:100], y_test[:100], "good")
    assert mon.alerts.active("digits") == []
    wrong = (y_test[100:160] + 1) % 10  # labels the model gets wrong
    label(x_test[100:160], wrong, "bad")
    assert [e.rule for e in mon.alerts.active("digits")] == ["low"]
    label(1.0 - x_test[160:260], y_test[160:260], "inverted")  # windows of 100 rows drift
    assert {e.rule for e in mon.alerts.active("digits")} == {"low", "drift"}
    label(x_test[260:460], y_test[260:460], "recovered")  # the last full window is clean
    assert mon.alerts.active("digits") == []
    mon.close()
    states = [(e["rule"], e["state"]) for e in received]
    assert ("low", "firing") in states and ("low", "resolved") in states
    assert ("drift", "firing") in states and ("drift", "resolved") in states
    # the default window (100 rows) was not what the "low" rule looked at
    low = [e for e in mon.alerts.events("digits") if e.rule == "low"]
    assert "on 50 samples" in low[-1].message


def test_restart_replays_stored_feedback(registry: Registry, runtime: Runtime) -> None:
    first = Monitor(registry, options=_options(), metrics_registry=CollectorRegistry())
    _, _, x_test, y_test, _ = _digits()
    ids = _serve(first, runtime, x_test[:60], "a", rows=6)
    first.add_feedback_many("digits", list(zip(ids, y_test[:60].tolist(), strict=True)))
    first.close()
    second = Monitor(registry, options=_options(), metrics_registry=CollectorRegistry())
    second.watch("digits")
    second.refresh()
    assert second.quality("digits")["windows"]["cumulative"]["count"] == 60
    second.close()


def test_retention_and_input_sampling(registry: Registry, monitor: Monitor) -> None:
    registry.register("big", _Linear(5000, 2), torch.zeros(2, 5000), task="regression")
    rt = registry.load("big:1")
    sampled = Monitor(registry, options=_options(input_sample_rate=0.0, retention_rows=3))
    for i in range(5):
        batch = {"x": np.ones((1, 5000), np.float32)}
        sampled.record("big", 1, rt.signature, f"b{i}", 0.001, batch, rt.predict_batch(batch))
    sampled.writer.flush()
    stored = sampled.observations.observations("big").observations
    assert len(stored) == 5 and all(o.inputs is None for o in stored)
    assert sampled.apply_retention() == 2
    assert [o.request_id for o in sampled.observations.observations("big").observations] == [
        "b2",
        "b3",
        "b4",
    ]
    sampled.close()
    rt.close()


def test_feedback_reads_back_off_while_none_comes(
    registry: Registry, monitor: Monitor, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchops.monitoring.feedback import FeedbackStore

    _, _, x_test, y_test, _ = _digits()
    ids = _serve(monitor, runtime, x_test[:40], "b")
    monitor.writer.flush()
    reads: list[int] = []
    labelled = monitor.observations.labelled

    def counted(model: str, **kwargs: Any) -> Any:
        reads.append(kwargs["since_id"])
        return labelled(model, **kwargs)

    monkeypatch.setattr(monitor.observations, "labelled", counted)

    def polls(n: int) -> list[bool]:
        """Whether each of ``n`` polls of the monitor's own loop read the feedback."""
        done = []
        for _ in range(n):
            before = len(reads)
            monitor.refresh(eager=False)
            done.append(len(reads) > before)
        return done

    # nothing comes: every poll, then every 2nd, then every 4th reads
    assert polls(12) == [True, True, False, True, False, False, False, True] + [False] * 3 + [True]
    before = len(reads)
    monitor.refresh()  # called directly (the quality route): reads at once
    assert len(reads) == before + 1
    # labels this monitor takes are read at its next poll
    monitor.add_feedback_many("digits", list(zip(ids[:20], y_test[:20].tolist(), strict=True)))
    assert polls(1) == [True]
    assert monitor.quality("digits")["windows"]["cumulative"]["count"] == 20
    # labels from another process (``torchops feedback`` without --url) within 4 polls
    assert polls(4) == [True, True, False, True]
    FeedbackStore(registry.engine).add_many(
        "digits", list(zip(ids[20:], y_test[20:40].tolist(), strict=True))
    )
    assert polls(4).count(True) >= 1
    assert monitor.quality("digits")["windows"]["cumulative"]["count"] == 40


def test_record_never_raises(monitor: Monitor, runtime: Runtime) -> None:
    monitor.record("digits", 1, runtime.signature, "x", 0.001, {}, {"output": "not an array"})  # type: ignore[dict-item]
    monitor.record("digits", 1, runtime.signature, "y", 0.001, {"x": np.zeros((1, 64))}, {})
    assert monitor.writer.pending("digits", "y") is not None


def test_options_are_checked() -> None:
    with pytest.raises(InvalidInput):
        MonitorOptions(input_sample_rate=1.5)
    with pytest.raises(InvalidInput):
        MonitorOptions(quality_window=0)
    with pytest.raises(InvalidInput, match="max_buffer_bytes"):
        MonitorOptions(max_buffer_bytes=0)
    with pytest.raises(InvalidInput):
        MonitorOptions(webhook_url="ftp://x")
    args = MonitorOptions(retention_days=2, webhook_url="http://h/x", leader=False).cli_args()
    assert "--retention-days=2" in args and "--monitor-follower" in args
