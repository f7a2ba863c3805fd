"""The OIP v2 codec, proven against tritonclient's own request builder and response parser."""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np
import orjson
import pytest
import tritonclient.http as th
from tritonclient.utils import triton_to_np_dtype

from torchops.errors import InvalidInput, TorchopsError
from torchops.serving.codec import (
    InferRequest,
    RequestedOutput,
    classify,
    decode_request,
    encode_error,
    encode_response,
)
from torchops.serving.datatypes import DATATYPES
from torchops.types import Array, Signature, TensorSpec

NUMERIC = [d for d in DATATYPES if d != "BYTES"]
LABELS = tuple(f"class_{i}" for i in range(5))


def _signature(**inputs: tuple[str, tuple[int, ...]]) -> Signature:
    return Signature(
        inputs=tuple(TensorSpec(n, dtype, shape) for n, (dtype, shape) in inputs.items()),
        outputs=(
            TensorSpec("scores", "float32", (-1, 5)),
            TensorSpec("mask", "bool", (-1, 2)),
        ),
        task="classification",
        labels=LABELS,
    )


MLP = _signature(INPUT__0=("float32", (-1, 64)))


def _sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> Array:
    rng = np.random.default_rng(seed)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)
    return (rng.standard_normal(shape) * 10).astype(dtype)


def _body(
    inputs: list[th.InferInput], outputs: list[th.InferRequestedOutput] | None = None, **kw: Any
) -> tuple[bytes, int | None]:
    body, length = th.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return bytes(body), length


def _parse(body: bytes, length: int | None) -> Any:
    return th.InferResult.from_response_body(body, header_length=length)


def _input(name: str, array: Array, datatype: str, binary: bool) -> th.InferInput:
    item = th.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array, binary_data=binary)
    return item


def _outputs() -> dict[str, Array]:
    scores = np.array([[0.1, 0.7, 0.2, 0.9, 0.0], [0.5, 0.4, 0.3, 0.2, 0.6]], np.float32)
    return {"scores": scores, "mask": np.array([[True, False], [False, True]])}


def _respond(request: InferRequest, signature: Signature = MLP, **outputs: Array) -> Any:
    body, length = encode_response(
        model_name="mlp",
        model_version="3",
        request_id="req-1",
        outputs=outputs or _outputs(),
        request=request,
        signature=signature,
    )
    return _parse(body, length)


# -- requests built by tritonclient ---------------------------------------------------------


# tritonclient sends BF16 only as binary data
@pytest.mark.parametrize(
    ("datatype", "binary"),
    [(d, b) for d in NUMERIC for b in (True, False) if b or d != "BF16"],
)
def test_tritonclient_request_every_datatype(datatype: str, binary: bool) -> None:
    dtype_name = DATATYPES[datatype].name
    signature = _signature(x=(dtype_name, (-1, 3, 4)))
    array = _sample(datatype, (2, 3, 4))
    body, length = _body([_input("x", array, datatype, binary)], request_id="abc")
    assert (length is not None) == binary
    request = decode_request(body, signature, header_length=length)
    got = request.inputs["x"]
    assert request.id == "abc"
    assert got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == array.tobytes()


def test_tritonclient_mixed_binary_and_json_inputs() -> None:
    signature = _signature(a=("float32", (-1, 4)), b=("int64", (-1,)), c=("float16", (-1, 2)))
    a, b, c = _sample("FP32", (3, 4)), _sample("INT64", (3,)), _sample("FP16", (3, 2))
    inputs = [_input("a", a, "FP32", True), _input("b", b, "INT64", False)]
    inputs.append(_input("c", c, "FP16", True))
    body, length = _body(inputs)
    request = decode_request(body, signature, header_length=length)
    for name, expected in {"a": a, "b": b, "c": c}.items():
        np.testing.assert_array_equal(request.inputs[name], expected)


def test_requested_outputs_and_defaults() -> None:
    x = _sample("FP32", (2, 64))
    body, length = _body([_input("INPUT__0", x, "FP32", True)])
    request = decode_request(body, MLP, header_length=length)
    # tritonclient asks for binary outputs when it names none
    assert request.outputs is None and request.binary_default is True
    outputs = [th.InferRequestedOutput("mask", binary_data=False)]
    outputs.append(th.InferRequestedOutput("scores", class_count=2))
    body, length = _body([_input("INPUT__0", x, "FP32", False)], outputs)
    request = decode_request(body, MLP, header_length=length)
    assert request.outputs == [RequestedOutput("mask", False), RequestedOutput("scores", True, 2)]


# -- responses parsed by tritonclient -------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_response_parsed_by_tritonclient(binary: bool) -> None:
    x = _sample("FP32", (2, 64))
    outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "mask")]
    body, length = _body([_input("INPUT__0", x, "FP32", binary)], outputs)
    result = _respond(decode_request(body, MLP, header_length=length))
    response = result.get_response()
    assert response["model_name"] == "mlp"
    assert response["model_version"] == "3"
    assert response["id"] == "req-1"
    for name, expected in _outputs().items():
        got = result.as_numpy(name)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        assert ("parameters" in result.get_output(name)) == binary


def test_default_outputs_follow_binary_data_output() -> None:
    x = _sample("FP32", (2, 64))
    body, length = _body([_input("INPUT__0", x, "FP32", False)])  # binary_data_output: true
    result = _respond(decode_request(body, MLP, header_length=length))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["scores", "mask"]
    assert all(o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])
    plain = orjson.dumps(
        {"inputs": [{"name": "INPUT__0", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    )
    body, length = encode_response(
        model_name="mlp",
        model_version="3",
        request_id="r",
        outputs={k: v[:1] for k, v in _outputs().items()},
        request=decode_request(plain, MLP),
        signature=MLP,
    )
    assert length is None
    assert orjson.loads(body)["outputs"][0]["data"] == pytest.approx([0.1, 0.7, 0.2, 0.9, 0.0])


@pytest.mark.parametrize("datatype", NUMERIC)
def test_every_output_datatype_round_trips(datatype: str) -> None:
    signature = Signature(
        inputs=(TensorSpec("x", "float32", (-1, 1)),),
        outputs=(TensorSpec("y", DATATYPES[datatype].name, (-1, 3)),),
    )
    y = _sample(datatype, (2, 3), seed=4)
    for binary in (True, False):
        body, length = _body(
            [_input("x", np.zeros((2, 1), np.float32), "FP32", True)],
            [th.InferRequestedOutput("y", binary_data=binary)],
        )
        result = _respond(decode_request(body, signature, header_length=length), signature, y=y)
        got = result.as_numpy("y")
        assert result.get_output("y")["datatype"] == datatype
        assert got.dtype == np.dtype(triton_to_np_dtype(datatype))
        np.testing.assert_array_equal(got.astype(np.float64), y.astype(np.float64))


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(binary: bool) -> None:
    x = _sample("FP32", (2, 64))
    outputs = [th.InferRequestedOutput("scores", binary_data=binary, class_count=3)]
    body, length = _body([_input("INPUT__0", x, "FP32", True)], outputs)
    result = _respond(decode_request(body, MLP, header_length=length))
    assert result.get_output("scores")["datatype"] == "BYTES"
    got = result.as_numpy("scores")
    assert got.shape == (2, 3)
    rows = [[e.decode() if isinstance(e, bytes) else e for e in row] for row in got.tolist()]
    assert rows == [
        ["0.900000:3:class_3", "0.700000:1:class_1", "0.200000:2:class_2"],
        ["0.600000:4:class_4", "0.500000:0:class_0", "0.400000:1:class_1"],
    ]


def test_classify_without_labels_ties_and_large_k() -> None:
    values = np.array([[1, 3, 3, 0]], dtype=np.int64)
    got = classify(values, 10)
    assert got.tolist() == [[b"3:1", b"3:2", b"1:0", b"0:3"]]
    one = classify(np.array([0.25, 0.75], np.float32), 1, ("a",))
    assert one.tolist() == [b"0.750000:1"]  # no label for index 1


def test_request_id_is_optional() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "INPUT__0", "shape": [1, 64], "datatype": "FP32", "data": [1] * 64}]}
    )
    request = decode_request(body, MLP)
    assert request.id is None and request.outputs is None and request.binary_default is False
    assert request.inputs["INPUT__0"].dtype == np.float32


def test_nested_json_data_and_parameters() -> None:
    body = orjson.dumps(
        {
            "id": "7",
            "parameters": {"custom": 1},
            "inputs": [
                {
                    "name": "INPUT__0",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "data": [list(range(64)), list(range(64, 128))],
                }
            ],
        }
    )
    request = decode_request(body, MLP)
    np.testing.assert_array_equal(request.inputs["INPUT__0"].reshape(-1), np.arange(128))
    assert request.parameters == {"custom": 1}


# -- bad requests ---------------------------------------------------------------------------


def _json(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


def _x(**override: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": "INPUT__0",
        "shape": [1, 64],
        "datatype": "FP32",
        "data": [0.5] * 64,
    }
    item.update(override)
    return {k: v for k, v in item.items() if v is not None}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": [', "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"inputs": []}', "needs 'inputs', a non-empty list"),
        (_json([_x(), _x()]), "input 'INPUT__0' is given twice"),
        (_json([_x(name="other")]), "unexpected input 'other'; the model takes 'INPUT__0'"),
        (_json([_x(name=3)]), "each input needs a 'name' string"),
        (_json([_x(datatype="FP64")]), "datatype 'FP64' does not match the model's 'FP32'"),
        (_json([_x(datatype=None)]), "datatype None does not match"),
        (_json([_x(shape=[1, 63])]), r"expected shape \[-1, 64\] FP32, got \[1, 63\]"),
        (_json([_x(shape=[64])]), r"expected shape \[-1, 64\] FP32, got \[64\]"),
        (_json([_x(shape=[0, 64], data=[])]), r"shape \[0, 64\] has no rows"),
        (_json([_x(shape=[1, "64"])]), "'shape' must be a list of non-negative integers"),
        (_json([_x(shape=[2, 64])]), r"shape \[2, 64\] needs 128 values, data has 64"),
        (_json([_x(data=[0.5] * 63)]), "needs 64 values, data has 63"),
        (_json([_x(data=None)]), "has neither 'data' nor binary_data_size"),
        (_json([_x(data=["a"] * 64)]), "FP32 data must be numbers"),
        (_json([_x()], id=5), "'id' must be a string"),
        (_json([_x()], parameters={"binary_data_output": "yes"}), "must be true or false"),
        (_json([_x()], outputs=[{"name": "nope"}]), "unknown output 'nope'; the model has"),
        (_json([_x()], outputs=[{"name": "mask"}, {"name": "mask"}]), "requested twice"),
        (
            _json([_x()], outputs=[{"name": "mask", "parameters": {"classification": -1}}]),
            "classification must be a non-negative integer",
        ),
        (
            _json([_x(parameters={"binary_data_size": 256})]),
            "has both 'data' and binary_data_size",
        ),
        (
            _json([_x(data=None, parameters={"binary_data_size": 256})]),
            "no Inference-Header-Content-Length header",
        ),
        (
            _json([_x(parameters={"shared_memory_region": "r"})]),
            "shared memory is not supported",
        ),
    ],
)
def test_bad_json_requests(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_request(body, MLP)


def test_missing_input_is_named() -> None:
    signature = _signature(a=("float32", (-1, 2)), b=("float32", (-1, 2)))
    body = _json([{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}])
    with pytest.raises(InvalidInput, match="missing input 'b'; the model takes 'a', 'b'"):
        decode_request(body, signature)
    body = _json(
        [
            {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
            {"name": "b", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
        ]
    )
    with pytest.raises(InvalidInput, match="different batch sizes"):
        decode_request(body, signature)


def test_nonfinite_json_values() -> None:
    # Python's json (and rapidjson, used by tritonclient) write NaN/Infinity literals
    body = json.dumps({"inputs": [_x(data=[float("nan")] + [0.0] * 63)]}).encode()
    with pytest.raises(InvalidInput, match="'INPUT__0' contains NaN"):
        decode_request(body, MLP)
    request = decode_request(body, MLP, reject_nonfinite=False)
    assert np.isnan(request.inputs["INPUT__0"][0, 0])
    inf = json.dumps({"inputs": [_x(data=[float("inf")] * 64)]}).encode()
    with pytest.raises(InvalidInput, match="NaN, infinity"):
        decode_request(inf, MLP)


def test_nonfinite_binary_values() -> None:
    x = np.zeros((1, 64), np.float32)
    x[0, 5] = np.inf
    body, length = _body([_input("INPUT__0", x, "FP32", True)])
    with pytest.raises(InvalidInput, match="'INPUT__0' contains NaN or infinity"):
        decode_request(body, MLP, header_length=length)
    request = decode_request(body, MLP, header_length=length, reject_nonfinite=False)
    assert np.isinf(request.inputs["INPUT__0"][0, 5])


def test_bad_binary_framing() -> None:
    x = _sample("FP32", (1, 64))
    body, length = _body([_input("INPUT__0", x, "FP32", True)])
    assert length is not None
    for bad in (0, -1, len(body) + 1):
        with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
            decode_request(body, MLP, header_length=bad)
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_request(body, MLP, header_length=length - 1)
    with pytest.raises(InvalidInput, match="runs past the end of the body"):
        decode_request(body[:-4], MLP, header_length=length)
    with pytest.raises(InvalidInput, match="body has 260 bytes after the JSON header"):
        decode_request(body + b"\0" * 4, MLP, header_length=length)
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_request(body, MLP)  # binary body without the header


def test_binary_size_must_match_shape() -> None:
    header = _json(
        [
            {
                "name": "INPUT__0",
                "shape": [1, 64],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 128},
            }
        ]
    )
    with pytest.raises(InvalidInput, match="needs 256 bytes of binary data"):
        decode_request(header + b"\0" * 128, MLP, header_length=len(header))


def test_bf16_binary_input() -> None:
    signature = _signature(x=("bfloat16", (-1, 2)))
    x = np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16)
    body, length = _body([_input("x", x, "BF16", True)])
    got = decode_request(body, signature, header_length=length).inputs["x"]
    assert got.dtype == x.dtype and got.tobytes() == x.tobytes()


def test_encode_response_errors() -> None:
    request = InferRequest(None, {}, [RequestedOutput("nope", False)], False, {})
    with pytest.raises(InvalidInput, match="unknown output 'nope'"):
        encode_response(
            model_name="m",
            model_version="1",
            request_id="r",
            outputs=_outputs(),
            request=request,
            signature=MLP,
        )
    request = InferRequest(None, {}, None, False, {})
    with pytest.raises(TorchopsError, match="the model returned no output 'mask'"):
        encode_response(
            model_name="m",
            model_version="1",
            request_id="r",
            outputs={"scores": _outputs()["scores"]},
            request=request,
            signature=MLP,
        )


def test_output_dtype_the_protocol_cannot_carry() -> None:
    request = InferRequest(None, {}, [RequestedOutput("scores", False)], False, {})
    with pytest.raises(TorchopsError, match="dtype complex64, which the protocol") as caught:
        encode_response(
            model_name="m",
            model_version="1",
            request_id="r",
            outputs={"scores": np.zeros((1, 5), np.complex64)},
            request=request,
            signature=MLP,
        )
    assert not isinstance(caught.value, InvalidInput)


def test_encode_error() -> None:
    assert orjson.loads(encode_error('bad "x"')) == {"error": 'bad "x"'}
