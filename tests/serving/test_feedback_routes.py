"""Feedback, alerts and quality routes, driven in-process through the ASGI app."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import inspect
from torch import nn

from torchops.monitoring.alerts import AlertRule
from torchops.monitoring.monitor import Monitor, MonitorOptions
from torchops.registry import Registry
from torchops.serving.app import TorchopsApp, create_app
from torchops.serving.auth import TokenAuth
from torchops.serving.manager import ModelManager
from torchops.serving.service import InferenceService

pytestmark = pytest.mark.anyio

TOKEN = "feedback-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LABELS = ["cat", "dog", "emu"]


class Net(nn.Module):
    def __init__(self, n_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


@pytest.fixture(scope="module")
def models_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clf`` (3 labelled classes, with a reference sample) and ``reg`` (2 outputs)."""
    home = tmp_path_factory.mktemp("feedback-models")
    with Registry(home) as registry:
        reference = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
        registry.register("clf", Net(3), torch.zeros(2, 4), labels=LABELS, reference=reference)
        registry.set_alias("clf", "production", 1)
        registry.register("reg", Net(2), torch.zeros(2, 4), task="regression")
        registry.set_alias("reg", "production", 1)
    return home


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def running(
    home: Path, *, monitor: bool = True, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, TorchopsApp]]:
    registry = Registry(home)
    manager = ModelManager(registry, poll_interval_s=3600.0)
    mon = None
    if monitor:
        opts = MonitorOptions(poll_interval_s=3600.0, quality_window=10, drift_window=50, **options)
        mon = Monitor(registry, options=opts, metrics_registry=manager.metrics.registry)
    app = create_app(InferenceService(manager, auth=TokenAuth(TOKEN), monitor=mon))
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://torchops") as client:
            yield client, app
    finally:
        await app.shutdown()
        registry.close()


@pytest.fixture
def home(models_home: Path, tmp_path: Path) -> Path:
    """A private copy of the module's registry."""
    target = tmp_path / "home"
    shutil.copytree(models_home, target)
    return target


@pytest.fixture
async def server(home: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TorchopsApp]]:
    async with running(home) as pair:
        yield pair


def tensor(x: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


async def infer(client: httpx.AsyncClient, model: str, x: np.ndarray[Any, Any], **body: Any) -> str:
    answer = await client.post(f"/v2/models/{model}/infer", json={"inputs": [tensor(x)], **body})
    assert answer.status_code == 200, answer.text
    rid: str = answer.json()["id"]
    return rid


def monitor_of(app: TorchopsApp) -> Monitor:
    assert app.service.monitor is not None
    return app.service.monitor


def stored(app: TorchopsApp, model: str) -> int:
    mon = monitor_of(app)
    mon.writer.flush()
    return mon.observations.count(model)


ROW = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)


async def test_feedback_by_id_and_its_errors(server: tuple[httpx.AsyncClient, TorchopsApp]) -> None:
    client, _ = server
    first, second = await infer(client, "clf", ROW), await infer(client, "clf", ROW)
    url = "/v2/models/clf/feedback"
    ok = await client.post(url, json={"id": first, "target": 1}, headers=AUTH)
    assert (ok.status_code, ok.json()) == (200, {"accepted": 1, "errors": []})
    again = await client.post(url, json={"id": first, "target": 2}, headers=AUTH)
    assert again.status_code == 409 and "already given" in again.json()["error"]
    unknown = await client.post(url, json={"id": "no-such-id", "target": 1}, headers=AUTH)
    assert unknown.status_code == 404 and "no-such-id" in unknown.json()["error"]
    for bad in (7, [0, 1], "wolf", 1.5, None):
        answer = await client.post(url, json={"id": second, "target": bad}, headers=AUTH)
        assert answer.status_code == 400, bad
        assert "error" in answer.json()
    label = await client.post(url, json={"id": second, "target": "emu"}, headers=AUTH)
    assert label.json() == {"accepted": 1, "errors": []}
    for body in (b"{not json", b"[1, 2]", b'{"id": "x"}', b'{"target": 1}'):
        answer = await client.post(url, content=body, headers=AUTH)
        assert answer.status_code == 400, body
        assert answer.json()["error"]


async def test_feedback_joins_a_prediction_not_yet_written(
    server: tuple[httpx.AsyncClient, TorchopsApp],
) -> None:
    client, app = server
    mon = monitor_of(app)
    mon.writer.flush_interval_s = 3600.0  # nothing is written until flushed
    mon.writer.flush()
    rid = await infer(client, "clf", ROW)
    assert mon.writer.pending("clf", rid) is not None
    answer = await client.post(
        "/v2/models/clf/feedback", json={"id": rid, "target": 0}, headers=AUTH
    )
    assert answer.json() == {"accepted": 1, "errors": []}
    quality = await client.get("/v2/models/clf/quality", headers=AUTH)  # flushes first
    assert quality.json()["windows"]["cumulative"]["count"] == 1


async def test_feedback_with_inputs(server: tuple[httpx.AsyncClient, TorchopsApp]) -> None:
    client, app = server
    url = "/v2/models/clf/feedback"
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    answer = await client.post(
        url, json={"inputs": [tensor(x)], "target": [0, "dog", 2]}, headers=AUTH
    )
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["accepted"] == 3 and data["errors"] == []
    assert len(data["ids"]) == 3 and all(i.endswith(f"/{n}") for n, i in enumerate(data["ids"]))
    single = await client.post(url, json={"inputs": [tensor(ROW)], "target": "cat"}, headers=AUTH)
    assert single.json()["accepted"] == 1 and len(single.json()["ids"]) == 1
    before = stored(app, "clf")
    for target in ([0, 1], 5, [0, 1, 9]):  # wrong count / a scalar for 3 rows / a bad class
        refused = await client.post(
            url, json={"inputs": [tensor(x)], "target": target}, headers=AUTH
        )
        assert refused.status_code == 400, target
    wrong = await client.post(
        url, json={"inputs": [{**tensor(x), "name": "y"}], "target": [0, 1, 2]}, headers=AUTH
    )
    assert wrong.status_code == 400
    assert stored(app, "clf") == before  # nothing predicted, nothing stored
    missing = await client.post(
        "/v2/models/nope/feedback", json={"inputs": [tensor(ROW)], "target": 0}, headers=AUTH
    )
    assert missing.status_code == 404


async def test_batch_feedback_takes_each_item_alone(
    server: tuple[httpx.AsyncClient, TorchopsApp],
) -> None:
    client, _ = server
    ids = [await infer(client, "clf", ROW) for _ in range(3)]
    many = await infer(client, "clf", np.repeat(ROW, 2, axis=0), id="pair")
    assert many == "pair"
    items = [
        {"id": ids[0], "target": 0},
        {"id": "unknown", "target": 1},
        {"id": ids[1], "target": 9},
        {"target": 1},
        {"id": ids[2], "target": "dog"},
        {"id": ids[0], "target": 1},
        {"id": "pair", "target": [1, 2]},
        "junk",
    ]
    answer = await client.post("/v2/models/clf/feedback", json={"items": items}, headers=AUTH)
    assert answer.status_code == 200
    data = answer.json()
    assert data["accepted"] == 4  # ids[0], ids[2], pair/0, pair/1
    assert [e["index"] for e in data["errors"]] == [1, 2, 3, 5, 7]
    assert "unknown" in data["errors"][0]["error"]
    not_list = await client.post("/v2/models/clf/feedback", json={"items": {}}, headers=AUTH)
    assert not_list.status_code == 400


async def test_a_request_of_several_rows_is_labelled_by_its_id(
    server: tuple[httpx.AsyncClient, TorchopsApp],
) -> None:
    client, _ = server
    rid = await infer(client, "clf", np.repeat(ROW, 3, axis=0), id="req-1")
    url = "/v2/models/clf/feedback"
    short = await client.post(url, json={"id": rid, "target": [0, 1]}, headers=AUTH)
    assert short.status_code == 400
    all_rows = await client.post(url, json={"id": rid, "target": [0, 1, 2]}, headers=AUTH)
    assert all_rows.json() == {"accepted": 3, "errors": []}
    one_row = await client.post(url, json={"id": "req-1/1", "target": 0}, headers=AUTH)
    assert one_row.status_code == 409


async def test_regression_feedback(server: tuple[httpx.AsyncClient, TorchopsApp]) -> None:
    client, _ = server
    rid = await infer(client, "reg", ROW)
    url = "/v2/models/reg/feedback"
    bad = await client.post(url, json={"id": rid, "target": [1.0, 2.0, 3.0]}, headers=AUTH)
    assert bad.status_code == 400
    ok = await client.post(url, json={"id": rid, "target": [1.0, 2.0]}, headers=AUTH)
    assert ok.json()["accepted"] == 1
    quality = (await client.get("/v2/models/reg/quality", headers=AUTH)).json()
    assert quality["windows"]["cumulative"]["count"] == 1
    assert quality["windows"]["cumulative"]["rmse"] > 0
    assert quality["drift"] is None


async def test_quality_route(server: tuple[httpx.AsyncClient, TorchopsApp]) -> None:
    client, _ = server
    rng = np.random.default_rng(0)
    ids = [
        await infer(client, "clf", rng.normal(size=(1, 4)).astype(np.float32)) for _ in range(60)
    ]
    items = [{"id": rid, "target": i % 3} for i, rid in enumerate(ids)]
    await client.post("/v2/models/clf/feedback", json={"items": items}, headers=AUTH)
    answer = await client.get("/v2/models/clf/quality", headers=AUTH)
    assert answer.status_code == 200
    data = answer.json()
    assert (data["model"], data["version"]) == ("clf", 1)
    windows = data["windows"]
    assert windows["cumulative"]["count"] == 60 and windows["last_n"]["count"] == 10
    assert windows["last_t"]["count"] == 60
    assert 0.0 <= windows["cumulative"]["accuracy"] <= 1.0
    assert {"precision[cat]", "recall[dog]", "f1[emu]", "log_loss"} <= set(windows["cumulative"])
    drift = data["drift"]
    assert drift is not None and drift["rows"] == 50  # one full drift window of 50
    assert not drift["dataset_drifted"]
    versioned = await client.get("/v2/models/clf/quality?version=1", headers=AUTH)
    assert versioned.json()["windows"]["cumulative"]["count"] == 60
    bad = await client.get("/v2/models/clf/quality?version=one", headers=AUTH)
    assert bad.status_code == 400
    unknown = await client.get("/v2/models/ghost/quality", headers=AUTH)
    assert unknown.status_code == 404


async def test_alerts_route_and_metrics(server: tuple[httpx.AsyncClient, TorchopsApp]) -> None:
    client, app = server
    mon = monitor_of(app)
    mon.alerts.add_rule(AlertRule("clf", "low-accuracy", "accuracy", "<", 0.9, min_samples=10))
    empty = (await client.get("/v2/models/clf/alerts", headers=AUTH)).json()
    assert empty["active"] == [] and empty["events"] == []
    assert [r["name"] for r in empty["rules"]] == ["low-accuracy"]
    ids = [await infer(client, "clf", ROW) for _ in range(10)]
    prediction = (await client.post("/v2/models/clf/infer", json={"inputs": [tensor(ROW)]})).json()
    predicted = int(np.argmax(prediction["outputs"][0]["data"]))
    wrong = (predicted + 1) % 3
    items = [{"id": rid, "target": wrong} for rid in ids]
    await client.post("/v2/models/clf/feedback", json={"items": items}, headers=AUTH)
    await client.get("/v2/models/clf/quality", headers=AUTH)  # takes the labels in
    mon.publish()
    alerts = (await client.get("/v2/models/clf/alerts", headers=AUTH)).json()
    assert alerts["model"] == "clf"
    assert [(e["rule"], e["state"]) for e in alerts["active"]] == [("low-accuracy", "firing")]
    assert alerts["events"][0]["value"] == 0.0
    text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    accuracy = families["torchops_model_accuracy"].samples[0]
    assert accuracy.labels == {"model": "clf", "version": "1"} and accuracy.value == 0.0
    assert "torchops_requests" in families  # the server's own metrics, same registry


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/clf/feedback"),
        ("GET", "/v2/models/clf/alerts"),
        ("GET", "/v2/models/clf/quality"),
    ],
)
async def test_routes_need_the_token(
    server: tuple[httpx.AsyncClient, TorchopsApp], method: str, path: str
) -> None:
    client, _ = server
    body = {"id": "x", "target": 0} if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = await client.request(method, path, json=body, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]


async def test_monitoring_off_is_a_clean_switch(home: Path) -> None:
    async with running(home, monitor=False) as (client, _):
        await infer(client, "clf", ROW)
        for method, path in (
            ("POST", "/v2/models/clf/feedback"),
            ("GET", "/v2/models/clf/alerts"),
            ("GET", "/v2/models/clf/quality"),
        ):
            body = {"id": "x", "target": 0} if method == "POST" else None
            answer = await client.request(method, path, json=body, headers=AUTH)
            assert answer.status_code == 503
            assert "monitoring is off" in answer.json()["error"]
        metrics = (await client.get("/metrics")).text
        assert "torchops_model_accuracy" not in metrics
    with Registry(home) as registry:
        assert "observations" not in inspect(registry.engine).get_table_names()
