"""The real server, spoken to by the real ``tritonclient.http`` (as Triton users do)."""

from __future__ import annotations

import stat
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import LABELS, Server, classifier

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture
def client(shared_server: Server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(shared_server.address)


def infer_input(x: np.ndarray, *, binary: bool, name: str = "x") -> httpclient.InferInput:
    item = httpclient.InferInput(name, list(x.shape), "FP32")
    item.set_data_from_numpy(x, binary_data=binary)
    return item


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "torchops"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_and_readiness(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("double")
    assert meta["platform"] == "pytorch_torchscript"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get_model_metadata("double", model_version="2")["name"] == "double"
    assert client.is_model_ready("double")
    config = client.get_model_config("double")
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert client.is_model_ready("double", model_version="2")
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer(client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool) -> None:
    result = client.infer(
        "double",
        [infer_input(X, binary=binary_in)],
        outputs=[httpclient.InferRequestedOutput("output", binary_data=binary_out)],
        request_id="abc-1",
    )
    np.testing.assert_allclose(result.as_numpy("output"), X * 2)
    response = result.get_response()
    assert response["model_version"] == "1"
    assert response["id"] == "abc-1"


def test_infer_default_outputs_and_explicit_version(
    client: httpclient.InferenceServerClient,
) -> None:
    result = client.infer("double", [infer_input(X, binary=True)], model_version="2")
    np.testing.assert_allclose(result.as_numpy("output"), X * 3)
    assert result.get_response()["model_version"] == "2"


def test_classification(client: httpclient.InferenceServerClient) -> None:
    import torch

    x = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]], dtype=np.float32)
    expected = classifier()(torch.from_numpy(x)).detach().numpy()
    result = client.infer(
        "clf",
        [infer_input(x, binary=True, name="input")],
        outputs=[httpclient.InferRequestedOutput("output", class_count=2)],
    )
    answer = result.as_numpy("output")
    assert answer.shape == (2, 2)
    for row, scores in zip(answer, expected, strict=True):
        order = np.argsort(-scores)[:2]
        for entry, index in zip(row, order, strict=True):
            value, idx, label = entry.decode().split(":")
            assert (int(idx), label) == (index, LABELS[index])
            assert float(value) == pytest.approx(scores[index], abs=1e-5)


def test_errors_reach_the_client(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [infer_input(X, binary=True)])
    assert unknown.value.status() == "404"
    assert "nope" in unknown.value.message()
    wrong = np.ones((2, 5), dtype=np.float32)
    with pytest.raises(InferenceServerException) as bad_shape:
        client.infer("double", [infer_input(wrong, binary=True)])
    assert bad_shape.value.status() == "400"
    assert "shape" in bad_shape.value.message()
    with pytest.raises(InferenceServerException) as bad_version:
        client.infer("double", [infer_input(X, binary=False)], model_version="42")
    assert bad_version.value.status() == "404"
    # still serving
    np.testing.assert_allclose(
        client.infer("double", [infer_input(X, binary=False)]).as_numpy("output"), X * 2
    )


def test_repository_index_load_unload(shared_server: Server) -> None:
    client = httpclient.InferenceServerClient(shared_server.address)
    auth = {"Authorization": f"Bearer {shared_server.token}"}
    with pytest.raises(InferenceServerException) as denied:
        client.get_model_repository_index()
    assert denied.value.status() == "401"
    index = {e["name"]: e["state"] for e in client.get_model_repository_index(headers=auth)}
    assert index == {"double": "READY", "clf": "READY"}
    with pytest.raises(InferenceServerException):
        client.unload_model("clf")
    client.unload_model("clf", headers=auth)
    assert not client.is_model_ready("clf")
    with pytest.raises(InferenceServerException) as gone:
        client.infer("clf", [infer_input(X, binary=True, name="input")])
    assert gone.value.status() == "503"
    client.load_model("clf", headers=auth)
    assert client.is_model_ready("clf")
    client.infer("clf", [infer_input(X, binary=True, name="input")])


def test_statistics(client: httpclient.InferenceServerClient) -> None:
    client.infer("double", [infer_input(X, binary=True)])
    stats = client.get_inference_statistics("double")
    by_version = {e["version"]: e for e in stats["model_stats"]}
    assert by_version["1"]["inference_stats"]["success"]["count"] >= 1
    (only,) = client.get_inference_statistics("double", "1")["model_stats"]
    assert only["version"] == "1"


def test_metrics_and_token_file(shared_server: Server) -> None:
    with urllib.request.urlopen(f"{shared_server.base}/metrics") as response:
        text = response.read().decode()
    assert "torchops_requests_total" in text
    assert 'torchops_loaded_versions{model="double",version="1"} 1.0' in text
    token_file = shared_server.home / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert str(token_file) in shared_server.stdout.read_text()
    assert shared_server.base in shared_server.stdout.read_text()
