"""The ASGI app in-process: every route, the binary extension and every error path."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from torchops.registry import Registry

from .conftest import LABELS, TOKEN, Serve, classifier

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def oip(x: np.ndarray, name: str = "x", **extra: Any) -> dict[str, Any]:
    item = {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return {"inputs": [item], **extra}


def binary_body(x: np.ndarray, outputs_binary: bool = True) -> tuple[bytes, int]:
    raw = x.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": outputs_binary}}],
        }
    )
    return header + raw, len(header)


X = np.arange(8, dtype=np.float32).reshape(2, 4)


# -- server metadata and health ------------------------------------------------------------


async def test_server_metadata_and_health(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        meta = (await client.get("/v2")).json()
        assert meta["name"] == "torchops"
        assert {"binary_tensor_data", "model_repository", "classification"} <= set(
            meta["extensions"]
        )
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200


async def test_not_ready_before_start_and_during_shutdown(serve: Serve, models_home: Path) -> None:
    async with serve(models_home, start=False) as (client, app):
        response = await client.get("/v2/health/ready")
        assert response.status_code == 503
        assert "error" in response.json()
        await app.startup()
        assert (await client.get("/v2/health/ready")).status_code == 200
        app.service.shutting_down = True
        assert (await client.get("/v2/health/ready")).status_code == 503


async def test_model_metadata(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        meta = (await client.get("/v2/models/double")).json()
        assert meta["name"] == "double"
        assert meta["versions"] == ["1"]
        assert meta["platform"] == "pytorch_torchscript"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]
        # an explicit version loads on demand and is then listed beside the routed one
        meta2 = (await client.get("/v2/models/double/versions/2")).json()
        assert meta2["versions"] == ["1", "2"]
        clf = (await client.get("/v2/models/clf")).json()
        assert clf["parameters"]["labels"] == LABELS


async def test_triton_style_config(serve: Serve, models_home: Path) -> None:
    async with serve(models_home, manager_options={"max_batch_size": 8}) as (client, _):
        config = (await client.get("/v2/models/double/config")).json()
        assert config["name"] == "double"
        assert config["max_batch_size"] == 8
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
        assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [4]}]
        assert (await client.get("/v2/models/double/versions/2/config")).status_code == 200
        assert (await client.get("/v2/models/nope/config")).status_code == 404


async def test_model_ready(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        response = await client.get("/v2/models/double/ready")
        assert response.status_code == 200
        assert response.json()["version"] == "1"
        assert (await client.get("/v2/models/double/versions/2/ready")).status_code == 200
        assert (await client.get("/v2/models/nope/ready")).status_code == 404


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("/v2/models/nope", 404, "nope"),
        ("/v2/models/plain", 404, "plain"),  # registered but not served (no alias)
        ("/v2/models/double/versions/9", 404, "9"),
        ("/v2/models/double/versions/abc", 400, "abc"),
        ("/v2/models/double/versions/0", 400, "0"),
        ("/v2/no/such/route", 404, "Not Found"),
    ],
)
async def test_metadata_errors(
    serve: Serve, models_home: Path, path: str, status: int, fragment: str
) -> None:
    async with serve(models_home) as (client, _):
        response = await client.get(path)
        assert response.status_code == status
        assert fragment in response.json()["error"]


# -- inference -----------------------------------------------------------------------------


async def test_infer_json_flat_and_nested(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        flat = await client.post("/v2/models/double/infer", json=oip(X, id="req-7"))
        assert flat.status_code == 200
        assert flat.headers["content-type"] == "application/json"
        body = flat.json()
        assert body["model_name"] == "double"
        assert body["model_version"] == "1"
        assert body["id"] == "req-7"
        (out,) = body["outputs"]
        assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [2, 4]
        np.testing.assert_allclose(out["data"], (X * 2).ravel())
        nested = oip(X)
        nested["inputs"][0]["data"] = X.tolist()
        again = (await client.post("/v2/models/double/infer", json=nested)).json()
        np.testing.assert_allclose(again["outputs"][0]["data"], (X * 2).ravel())


async def test_request_ids_generated_or_taken_from_header(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        first = (await client.post("/v2/models/double/infer", json=oip(X))).json()["id"]
        second = (await client.post("/v2/models/double/infer", json=oip(X))).json()["id"]
        assert first and second and first != second
        headed = await client.post(
            "/v2/models/double/infer", json=oip(X), headers={"X-Request-Id": "from-header"}
        )
        assert headed.json()["id"] == "from-header"


async def test_access_log_is_off_by_default_and_structured_when_on(
    serve: Serve, models_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="torchops.access"):
        async with serve(models_home) as (client, _):
            await client.post("/v2/models/double/infer", json=oip(X))
        assert not [r for r in caplog.records if r.name == "torchops.access"]
        async with serve(models_home, access_log=True) as (client, _):
            await client.post("/v2/models/double/infer", json=oip(X, id="logged"))
            await client.post("/v2/models/double/infer", content=b"{bad")
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "torchops.access"]
    assert lines[0]["id"] == "logged" and lines[0]["status"] == 200
    assert lines[0]["model"] == "double" and lines[0]["version"] == 1
    assert lines[1]["status"] == 400


async def test_infer_explicit_version(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        body = (await client.post("/v2/models/double/versions/2/infer", json=oip(X))).json()
        assert body["model_version"] == "2"
        np.testing.assert_allclose(body["outputs"][0]["data"], (X * 3).ravel())
        routed = (await client.post("/v2/models/double/infer", json=oip(X))).json()
        assert routed["model_version"] == "1"


async def test_infer_binary_both_ways(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        body, length = binary_body(X)
        response = await client.post(
            "/v2/models/double/infer",
            content=body,
            headers={
                "Inference-Header-Content-Length": str(length),
                "Content-Type": "application/octet-stream",
            },
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        json_length = int(response.headers["inference-header-content-length"])
        header = orjson.loads(response.content[:json_length])
        (out,) = header["outputs"]
        assert out["parameters"]["binary_data_size"] == X.nbytes
        values = np.frombuffer(response.content[json_length:], dtype="<f4").reshape(out["shape"])
        np.testing.assert_array_equal(values, X * 2)
        # binary in, JSON out
        body, length = binary_body(X, outputs_binary=False)
        plain = await client.post(
            "/v2/models/double/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(length)},
        )
        assert plain.headers["content-type"] == "application/json"
        np.testing.assert_allclose(plain.json()["outputs"][0]["data"], (X * 2).ravel())


async def test_classification_extension(serve: Serve, models_home: Path) -> None:
    x = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
    expected = classifier()(__import__("torch").from_numpy(x)).detach().numpy()[0]
    order = np.argsort(-expected)[:2]
    async with serve(models_home) as (client, _):
        request = oip(x, "input", outputs=[{"name": "output", "parameters": {"classification": 2}}])
        out = (await client.post("/v2/models/clf/infer", json=request)).json()["outputs"][0]
        assert out["datatype"] == "BYTES"
        assert out["shape"] == [1, 2]
        for text, index in zip(out["data"], order, strict=True):
            value, idx, label = text.split(":")
            assert int(idx) == index and label == LABELS[index]
            assert float(value) == pytest.approx(expected[index], abs=1e-5)


async def test_unknown_requested_output(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        response = await client.post(
            "/v2/models/double/infer", json=oip(X, outputs=[{"name": "logits"}])
        )
        assert response.status_code == 400
        assert "logits" in response.json()["error"]


def _json_with(**change: Any) -> bytes:
    item: dict[str, Any] = {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}
    item.update(change)
    return orjson.dumps({"inputs": [item]})


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        (b"{not json", {}, "malformed JSON"),
        (b"[1, 2]", {}, "JSON object"),
        (b'{"inputs": []}', {}, "inputs"),
        (_json_with(name="y"), {}, "'y'"),
        (_json_with(datatype="INT64"), {}, "datatype"),
        (_json_with(shape=[2, 5]), {}, "shape"),
        (_json_with(shape=[4]), {}, "shape"),  # wrong rank
        (_json_with(data=[0.5] * 7), {}, "8"),  # data length does not match the shape
        (
            b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,NaN,4]}]}',
            {},
            "NaN",
        ),
        (_json_with(), {"Inference-Header-Content-Length": "abc"}, "not a number"),
        (_json_with(), {"Inference-Header-Content-Length": "100000"}, "does not fit"),
        (_json_with(), {"Content-Encoding": "br"}, "Content-Encoding"),
        (b"\x1f\x8b\x08garbage", {"Content-Encoding": "gzip"}, "gzip"),
        (gzip.compress(_json_with())[:-10], {"Content-Encoding": "gzip"}, "truncated"),
    ],
)
async def test_bad_requests_get_400_naming_the_problem(
    serve: Serve, models_home: Path, body: bytes, headers: dict[str, str], fragment: str
) -> None:
    async with serve(models_home) as (client, _):
        response = await client.post("/v2/models/double/infer", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert fragment in response.json()["error"]
        # and the server keeps serving everyone else
        ok = await client.post("/v2/models/double/infer", json=oip(X))
        assert ok.status_code == 200


async def test_two_inputs_same_name_missing_input(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        body = {"inputs": []}
        body["inputs"] = [oip(X)["inputs"][0], oip(X)["inputs"][0]]
        twice = await client.post("/v2/models/double/infer", json=body)
        assert twice.status_code == 400 and "twice" in twice.json()["error"]
        missing = await client.post("/v2/models/double/infer", json={"inputs": [{"name": "x"}]})
        assert missing.status_code == 400


async def test_compressed_bodies(serve: Serve, models_home: Path) -> None:
    raw = orjson.dumps(oip(X))
    async with serve(models_home) as (client, _):
        for encoding, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
            response = await client.post(
                "/v2/models/double/infer", content=data, headers={"Content-Encoding": encoding}
            )
            assert response.status_code == 200, (encoding, response.text)
            np.testing.assert_allclose(response.json()["outputs"][0]["data"], (X * 2).ravel())


async def test_body_size_limit(serve: Serve, models_home: Path) -> None:
    async with serve(models_home, max_body_bytes=300) as (client, _):
        big = orjson.dumps(oip(np.zeros((20, 4), dtype=np.float32)))
        response = await client.post("/v2/models/double/infer", content=big)
        assert response.status_code == 413
        assert "300" in response.json()["error"]
        bomb = gzip.compress(b" " * 10_000 + orjson.dumps(oip(X)))
        inflated = await client.post(
            "/v2/models/double/infer", content=bomb, headers={"Content-Encoding": "gzip"}
        )
        assert inflated.status_code == 413
        small = await client.post("/v2/models/double/infer", json=oip(X[:1]))
        assert small.status_code == 200


async def test_unknown_model_and_version_on_infer(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        assert (await client.post("/v2/models/nope/infer", json=oip(X))).status_code == 404
        unknown_version = await client.post("/v2/models/double/versions/7/infer", json=oip(X))
        assert unknown_version.status_code == 404
        bad_version = await client.post("/v2/models/double/versions/x1/infer", json=oip(X))
        assert bad_version.status_code == 400
        assert "x1" in bad_version.json()["error"]


async def test_model_error_is_500_with_request_id_and_traceback(
    serve: Serve, models_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = np.full((1, 4), 500.0, dtype=np.float32)
    good = np.ones((1, 4), dtype=np.float32)
    async with serve(models_home) as (client, _):
        with caplog.at_level(logging.ERROR, logger="torchops.serving"):
            responses = await asyncio.gather(
                *(
                    client.post("/v2/models/fragile/infer", json=oip(bad if i == 3 else good))
                    for i in range(8)
                )
            )
        statuses = [r.status_code for r in responses]
        assert statuses == [200, 200, 200, 500, 200, 200, 200, 200]
        failed = responses[3].json()
        assert failed["id"] and failed["id"] in failed["error"]
        records = [r for r in caplog.records if r.exc_info is not None]
        assert any(failed["id"] in r.getMessage() for r in records)
        assert any("above 100" in str(r.exc_info[1]) for r in records if r.exc_info)
        for r in responses[:3]:
            np.testing.assert_allclose(r.json()["outputs"][0]["data"], [2.0] * 4)


async def test_overloaded_answers_503_with_retry_after(serve: Serve, models_home: Path) -> None:
    options = {"max_queue": 1, "max_batch_size": 1}
    async with serve(models_home, manager_options=options) as (client, _):
        responses = await asyncio.gather(
            *(client.post("/v2/models/slow/infer", json=oip(X[:1])) for _ in range(4))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200
        rejected = [r for r in responses if r.status_code == 503]
        assert rejected, statuses
        assert int(rejected[0].headers["retry-after"]) >= 1
        assert "overloaded" in rejected[0].json()["error"]


async def test_deadline_answers_504(serve: Serve, models_home: Path) -> None:
    options = {"max_batch_size": 1}
    async with serve(models_home, manager_options=options, request_timeout_s=0.02) as (
        client,
        _,
    ):
        responses = await asyncio.gather(
            *(client.post("/v2/models/slow/infer", json=oip(X[:1])) for _ in range(3))
        )
        statuses = [r.status_code for r in responses]
        assert 504 in statuses, statuses
        assert set(statuses) <= {200, 504}
        timed_out = next(r for r in responses if r.status_code == 504)
        assert "deadline" in timed_out.json()["error"]


# -- auth ----------------------------------------------------------------------------------


async def test_repository_needs_the_token(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        missing = await client.post("/v2/repository/index")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.post("/v2/repository/index", headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
        basic = await client.post("/v2/repository/index", headers={"Authorization": "Basic x"})
        assert basic.status_code == 401
        for path in ("/v2/repository/models/double/unload", "/v2/repository/models/double/load"):
            assert (await client.post(path)).status_code == 401
        # nothing changed
        assert (await client.post("/v2/models/double/infer", json=oip(X))).status_code == 200


async def test_auth_inference(serve: Serve, models_home: Path) -> None:
    async with serve(models_home, auth_inference=True) as (client, _):
        denied = await client.post("/v2/models/double/infer", json=oip(X))
        assert denied.status_code == 401
        allowed = await client.post("/v2/models/double/infer", json=oip(X), headers=AUTH)
        assert allowed.status_code == 200


# -- repository extension ------------------------------------------------------------------


async def test_repository_index(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        index = (await client.post("/v2/repository/index", headers=AUTH)).json()
        states = {e["name"]: e["state"] for e in index}
        assert states == {
            "double": "READY",
            "clf": "READY",
            "fragile": "READY",
            "slow": "READY",
            "plain": "UNAVAILABLE",
        }
        ready_only = await client.post("/v2/repository/index", headers=AUTH, json={"ready": True})
        assert "plain" not in {e["name"] for e in ready_only.json()}


async def test_unload_stays_until_load_even_when_alias_moves(serve: Serve, home: Path) -> None:
    async with serve(home) as (client, app):
        unloaded = await client.post("/v2/repository/models/double/unload", headers=AUTH)
        assert unloaded.status_code == 200
        response = await client.post("/v2/models/double/infer", json=oip(X))
        assert response.status_code == 503
        assert "unloaded" in response.json()["error"]
        assert (await client.get("/v2/models/double/ready")).status_code == 503
        with Registry(home) as registry:
            registry.set_alias("double", "production", 2)
        await app.service.manager.sync()  # what the poller does every second
        assert (await client.post("/v2/models/double/infer", json=oip(X))).status_code == 503
        index = (await client.post("/v2/repository/index", headers=AUTH)).json()
        assert {"name": "double", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        loaded = await client.post("/v2/repository/models/double/load", headers=AUTH)
        assert loaded.status_code == 200
        body = (await client.post("/v2/models/double/infer", json=oip(X))).json()
        assert body["model_version"] == "2"
        np.testing.assert_allclose(body["outputs"][0]["data"], (X * 3).ravel())


async def test_load_a_model_without_alias_and_errors(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        loaded = await client.post("/v2/repository/models/plain/load", headers=AUTH)
        assert loaded.status_code == 200
        body = (await client.post("/v2/models/plain/infer", json=oip(X))).json()
        np.testing.assert_allclose(body["outputs"][0]["data"], (X * 5).ravel())
        unknown = await client.post("/v2/repository/models/nope/load", headers=AUTH)
        assert unknown.status_code == 404
        config = await client.post(
            "/v2/repository/models/double/load",
            headers=AUTH,
            json={"parameters": {"config": "{}"}},
        )
        assert config.status_code == 400
        assert (
            await client.post("/v2/repository/models/nope/unload", headers=AUTH)
        ).status_code == 404


# -- statistics, metrics, docs -------------------------------------------------------------


async def test_stats_and_metrics(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        for _ in range(3):
            await client.post("/v2/models/double/infer", json=oip(X))
        await client.post("/v2/models/double/infer", content=b"{bad")
        stats = (await client.get("/v2/models/double/stats")).json()["model_stats"]
        (entry,) = stats
        assert entry["name"] == "double" and entry["version"] == "1"
        assert entry["inference_stats"]["success"]["count"] == 3
        assert entry["inference_stats"]["success"]["ns"] > 0
        assert entry["inference_count"] == 6  # 3 requests of 2 rows
        assert entry["execution_count"] >= 1
        everything = (await client.get("/v2/models/stats")).json()["model_stats"]
        assert {"double", "clf", "fragile", "slow"} <= {e["name"] for e in everything}
        assert (await client.get("/v2/models/nope/stats")).status_code == 404
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'torchops_requests_total{model="double",outcome="ok",version="1"} 3.0' in text
        assert 'torchops_loaded_versions{model="double",version="1"} 1.0' in text
        assert "torchops_batch_size_bucket" in text


async def test_openapi_documents_the_api(serve: Serve, models_home: Path) -> None:
    async with serve(models_home) as (client, _):
        schema = (await client.get("/openapi.json")).json()
        paths = schema["paths"]
        for path in (
            "/v2/models/{model}/infer",
            "/v2/models/{model}/versions/{version}/infer",
            "/v2/repository/index",
            "/v2/repository/models/{model}/load",
            "/v2/health/ready",
            "/metrics",
        ):
            assert path in paths
        assert "requestBody" in paths["/v2/models/{model}/infer"]["post"]
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert (await client.get("/docs")).status_code == 200


async def test_fastapi_infer_route_answers_like_the_fast_path(
    serve: Serve, models_home: Path
) -> None:
    """The documented FastAPI route and the raw fast path give identical answers."""
    import httpx

    async with serve(models_home) as (client, app):
        body = orjson.dumps(oip(X, id="same"))
        fast = await client.post("/v2/models/double/infer", content=body)
        transport = httpx.ASGITransport(app=app.api)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as direct:
            slow = await direct.post("/v2/models/double/infer", content=body)
            bad = await direct.post("/v2/models/double/infer", content=b"{bad")
        assert fast.status_code == slow.status_code == 200
        assert fast.content == slow.content
        assert bad.status_code == 400
