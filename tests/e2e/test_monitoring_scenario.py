"""The monitoring scenario on real digits, against the real server process.

A small MLP trained on scikit-learn's digits serves clean traffic (no drift, live accuracy
equal to the offline test accuracy), then inverted images (drift flagged on the pixels,
accuracy drop once labels arrive, an alert fires and reaches a webhook), then clean
traffic again (the alert resolves). Prometheus text and TensorBoard event files are read
back with their own parsers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchops.monitoring.alerts import AlertRule, AlertStore
from torchops.quickstart.data import load_digits_data
from torchops.quickstart.model import DigitsMLP
from torchops.quickstart.train import evaluate, train_classifier
from torchops.registry import Registry
from torchops.types import Array

from .conftest import StartServer

ROWS_PER_REQUEST = 5
WINDOW = 200  # rows of the last-N quality window and of each drift window
DEADLINE_S = 90.0


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback HTTP receiver collecting the alert events POSTed to it."""
    received: list[dict[str, Any]] = []
    server = HTTPServer(("127.0.0.1", 0), type("Hook", (_Hook,), {"received": received}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    server.shutdown()
    server.server_close()


def _train(home: Path) -> tuple[Array, Array, float]:
    """Train the quickstart's MLP briefly, register it with its training sample as the
    reference; returns the test split and the offline test accuracy."""
    data = load_digits_data(seed=0)
    torch.manual_seed(0)
    model = DigitsMLP(data.n_features, data.n_classes, hidden=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_classifier(
        model, optimizer, data.x_train, data.y_train, data.x_test, data.y_test,
        epochs=12, batch_size=64, seed=0,
    )  # fmt: skip
    accuracy = evaluate(model, data.x_test, data.y_test).accuracy
    with Registry(home) as registry:
        registry.register(
            "digits",
            model,
            torch.from_numpy(data.x_train[:2]),
            formats=("torchscript",),
            labels=list(data.labels),
            reference=data.x_train,
        )
        registry.set_alias("digits", "production", 1)
        AlertStore(registry.engine).add_rule(
            AlertRule("digits", "accuracy-drop", "accuracy", "<", 0.7, min_samples=100)
        )
    return data.x_test, data.y_test, accuracy


def _wait(what: str, check: Callable[[], Any]) -> Any:
    """Poll ``check`` until it returns something truthy (the monitor works in the background)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_digits_scenario(
    launch: StartServer, tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    home = tmp_path / "home"
    x_test, y_test, offline_accuracy = _train(home)
    assert offline_accuracy > 0.9
    server = launch(
        home,
        f"--webhook={url}",
        "--snapshot-interval=0.3",
        f"--quality-window={WINDOW}",
        f"--drift-window={WINDOW}",
    )
    auth = {"Authorization": f"Bearer {server.token}"}
    client = httpx.Client(base_url=server.base, timeout=30)
    sent = 0

    def traffic(x: Array, y: Array, tag: str) -> None:
        """Predict ``x`` in requests of several rows, then label every request by its id."""
        nonlocal sent
        items = []
        for start in range(0, len(x), ROWS_PER_REQUEST):
            rows = x[start : start + ROWS_PER_REQUEST]
            tensor = {"name": "x", "shape": list(rows.shape), "datatype": "FP32"}
            body = {"id": f"{tag}-{start}", "inputs": [{**tensor, "data": rows.ravel().tolist()}]}
            answer = client.post("/v2/models/digits/infer", json=body)
            assert answer.status_code == 200, answer.text
            labels = y[start : start + ROWS_PER_REQUEST].tolist()
            items.append({"id": answer.json()["id"], "target": labels})
        answer = client.post("/v2/models/digits/feedback", json={"items": items}, headers=auth)
        assert answer.json() == {"accepted": len(x), "errors": []}
        sent += len(x)

    def quality() -> dict[str, Any]:
        answer = client.get("/v2/models/digits/quality", headers=auth)
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()
        return data

    def alerts() -> dict[str, Any]:
        data: dict[str, Any] = client.get("/v2/models/digits/alerts", headers=auth).json()
        return data

    def settled() -> dict[str, Any] | None:
        """The live view once every labelled row counts and the drift window is full."""
        live = quality()
        full = live["drift"] is not None and live["drift"]["rows"] == WINDOW
        return live if live["windows"]["cumulative"]["count"] == sent and full else None

    # 1. clean traffic: no drift, live accuracy = offline test accuracy
    traffic(x_test, y_test, "clean")
    live = _wait("the clean traffic to be labelled", settled)
    assert live["windows"]["cumulative"]["accuracy"] == pytest.approx(offline_accuracy, abs=0.01)
    assert not live["drift"]["dataset_drifted"]
    assert live["drift"]["drifted_share"] < 0.5
    time.sleep(1.0)  # a few publishing rounds
    assert alerts()["active"] == []

    # 2. inverted intensities: drift on the pixels, the accuracy drops, the alert fires
    traffic(1.0 - x_test, y_test, "inverted")
    live = _wait("drift to be flagged", lambda: (q := quality())["drift"]["dataset_drifted"] and q)
    drifted = {f["name"] for f in live["drift"]["features"] if f["drifted"]}
    assert "x[0]" in drifted  # blank in every training image, lit in every inverted one
    assert live["drift"]["drifted_share"] >= 0.5
    last_n = _wait("the labels of the shifted traffic", lambda: settled())["windows"]["last_n"]
    assert last_n["count"] == WINDOW and last_n["accuracy"] < 0.5
    firing = _wait("the alert to fire", lambda: alerts()["active"])
    assert [(e["rule"], e["state"], e["version"]) for e in firing] == [
        ("accuracy-drop", "firing", 1)
    ]

    # 3. clean traffic again: the last-N window recovers and the alert resolves
    traffic(x_test, y_test, "recovered")
    _wait("the alert to resolve", lambda: not alerts()["active"])
    live = _wait("a clean drift window", lambda: (q := settled()) and q)
    assert live["windows"]["last_n"]["accuracy"] > 0.9
    assert not live["drift"]["dataset_drifted"]
    events = alerts()["events"]
    assert [e["state"] for e in events[:2]] == ["resolved", "firing"]  # newest first
    _wait("both webhook calls", lambda: len(received) >= 2)
    assert [(e["rule"], e["state"]) for e in received] == [
        ("accuracy-drop", "firing"),
        ("accuracy-drop", "resolved"),
    ]

    # Prometheus: the monitoring gauges beside the serving metrics, labelled by version
    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = client.get("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    # every predicted row stored, none waiting or dropped
    written = ("torchops_observations_written_total", ())
    samples = _wait("every prediction to be stored", lambda: (m := scrape())[written] == sent and m)
    assert samples[("torchops_observations_buffered", ())] == 0
    assert samples[("torchops_observations_buffer_capacity", ())] > 0
    assert not any(name == "torchops_observations_dropped_total" for name, _ in samples)

    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted({"model": "digits", "version": "1", **labels}.items()))

    assert samples[key("torchops_model_accuracy")] > 0.9
    assert samples[key("torchops_model_labelled_observations")] == WINDOW
    psi = [v for (name, _), v in samples.items() if name == "torchops_feature_drift_psi"]
    assert len(psi) == 64 and all(v >= 0 for v in psi)
    assert key("torchops_feature_drift_psi", feature="x[0]") in samples
    assert samples[key("torchops_dataset_drift")] == 0.0
    assert samples[key("torchops_requests_total", outcome="ok")] >= 3 * len(x_test) / 5
    client.close()

    # TensorBoard: event files of the version, read by TensorBoard's own reader
    assert server.stop() == 0
    events_dir = home / "tensorboard" / "digits" / "1"
    accumulator = EventAccumulator(str(events_dir))
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"quality/last_n/accuracy", "quality/cumulative/accuracy", "drift/share"} <= set(
        tags["scalars"]
    )
    accuracy = [e.value for e in accumulator.Scalars("quality/last_n/accuracy")]
    assert max(accuracy) > 0.9 and min(accuracy) < 0.5  # the drop and the recovery
    shares = [e.value for e in accumulator.Scalars("drift/share")]
    assert max(shares) >= 0.5 and min(shares) < 0.5
    assert {"inputs", "outputs"} <= set(tags["histograms"])
    assert np.isfinite(accuracy).all()


def test_two_workers_share_feedback_and_one_leads(launch: StartServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    data = load_digits_data(seed=0)
    with Registry(home) as registry:
        torch.manual_seed(0)
        model = DigitsMLP(data.n_features, data.n_classes, hidden=16)
        registry.register(
            "digits", model, torch.from_numpy(data.x_train[:2]), formats=("torchscript",),
            labels=list(data.labels), reference=data.x_train,
        )  # fmt: skip
        registry.set_alias("digits", "production", 1)
    server = launch(home, "--workers=2", "--snapshot-interval=0.3")
    auth = {"Authorization": f"Bearer {server.token}"}
    from concurrent.futures import ThreadPoolExecutor

    def predict(row: Array) -> str:
        tensor = {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}
        # a connection per request, several at once: both workers get to accept some
        with httpx.Client(base_url=server.base, timeout=30) as one:
            answer = one.post("/v2/models/digits/infer", json={"inputs": [tensor]})
            assert answer.status_code == 200, answer.text
            rid: str = answer.json()["id"]
            return rid

    # which worker accepts a connection is the kernel's choice: send rounds of 60 until
    # both have answered some (one busy worker can take a whole round on a loaded machine)
    ids: list[str] = []
    targets: list[int] = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            ids += pool.map(predict, data.x_test[:60])
            targets += [int(t) for t in data.y_test[:60]]
            if len({i.rsplit("-", 1)[0] for i in ids}) == 2:
                break
    with httpx.Client(base_url=server.base, timeout=30) as client:
        assert len({i.rsplit("-", 1)[0] for i in ids}) == 2  # both workers answered
        # labels sent at once, whichever worker gets them and wherever the predictions are
        items = [{"id": i, "target": t} for i, t in zip(ids, targets, strict=True)]
        answer = client.post("/v2/models/digits/feedback", json={"items": items}, headers=auth)
        assert answer.json() == {"accepted": len(items), "errors": []}
        _wait(
            "both workers' predictions to be labelled",
            lambda: (
                client.get("/v2/models/digits/quality", headers=auth).json()["windows"][
                    "cumulative"
                ]["count"]
                == len(items)
            ),
        )
    assert server.stop() == 0
    # the leading worker alone writes TensorBoard files
    assert len(list((home / "tensorboard" / "digits" / "1").glob("events.out.tfevents.*"))) == 1
