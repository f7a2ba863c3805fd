"""Open Inference Protocol v2 inference requests and responses, JSON and binary.

A request body is a JSON object, optionally followed by binary tensor data: then the
``Inference-Header-Content-Length`` header gives the JSON part's length and each binary
input says how many of the following bytes are its own with ``parameters.binary_data_size``.
Responses mirror that: outputs asked for in binary (``parameters.binary_data`` per
requested output, or the request's ``parameters.binary_data_output`` default) are appended
after the JSON, whose length is returned for the response header. The classification
extension (``parameters.classification: k``) answers the top ``k`` entries of an output as
``"value:index[:label]"`` strings.

Everything a client can get wrong raises ``InvalidInput`` with a message that names the
input or output and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from torchops.errors import InvalidInput, TorchopsError
from torchops.serving.datatypes import (
    DATATYPES,
    array_from_binary,
    array_from_json,
    binary_data,
    datatype_of,
    json_data,
)
from torchops.types import Array, Signature, TensorSpec

__all__ = [
    "InferRequest",
    "RequestedOutput",
    "classify",
    "decode_request",
    "encode_error",
    "encode_response",
    "json_object",
]


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for: binary or JSON, and top-k classification if > 0."""

    name: str
    binary: bool
    class_count: int = 0


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request. ``outputs`` is None when the client named none."""

    id: str | None
    inputs: dict[str, Array]
    outputs: list[RequestedOutput] | None
    binary_default: bool
    parameters: dict[str, Any] = field(default_factory=dict)


class _InputPlan:
    __slots__ = ("datatype", "rank", "shape", "spec")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.datatype = datatype_of(spec.dtype)
        self.rank = len(spec.shape)
        self.shape = spec.shape


class _Plan:
    """What decoding needs from a signature, computed once per signature object."""

    __slots__ = ("batched", "default_outputs", "input_names", "inputs", "outputs")

    def __init__(self, signature: Signature) -> None:
        self.inputs = {spec.name: _InputPlan(spec) for spec in signature.inputs}
        self.input_names = ", ".join(repr(n) for n in self.inputs)
        self.outputs = frozenset(signature.output_names)
        # every output, in JSON (False) or binary (True): what a request naming none gets
        self.default_outputs = {
            b: tuple(RequestedOutput(n, b) for n in signature.output_names) for b in (False, True)
        }
        # a leading -1 on every input means requests can be stacked along dim 0
        self.batched = all(p.rank >= 1 and p.shape[0] == -1 for p in self.inputs.values())


_PLANS: dict[int, tuple[Signature, _Plan]] = {}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}


def _plan(signature: Signature) -> _Plan:
    entry = _PLANS.get(id(signature))
    if entry is not None and entry[0] is signature:
        return entry[1]
    plan = _Plan(signature)
    if len(_PLANS) >= 256:
        _PLANS.clear()
    _PLANS[id(signature)] = (signature, plan)  # keeps the signature alive: ids stay unique
    return plan


def _fmt(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _load_json(header: bytes | memoryview) -> Any:
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        error = str(exc)  # not the exception: its traceback holds this frame, and the body
    # orjson refuses NaN/Infinity literals, which Python and rapidjson clients emit; the
    # standard parser reads them so the caller can accept or reject non-finite values
    try:
        return json.loads(bytes(header))
    except (ValueError, RecursionError):
        raise InvalidInput(f"malformed JSON in the request body: {error}") from None


def decode_request(
    body: bytes,
    signature: Signature,
    *,
    header_length: int | None = None,
    reject_nonfinite: bool = True,
) -> InferRequest:
    """Decode an inference request for a model with ``signature``.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None when absent:
    the whole body is JSON). ``reject_nonfinite`` refuses NaN and infinity in float inputs.
    """
    binary: memoryview | None = None
    if header_length is None:
        request = _load_json(body)
    else:
        if type(header_length) is not int or not 0 < header_length <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} does not fit a body of "
                f"{len(body)} bytes"
            )
        view = memoryview(body)
        request = _load_json(view[:header_length])
        binary = view[header_length:]
    if type(request) is not dict:
        raise InvalidInput("the request body must be a JSON object")
    items = request.get("inputs")
    if type(items) is not list or not items:
        raise InvalidInput("the request needs 'inputs', a non-empty list")
    plan = _plan(signature)
    arrays: dict[str, Array] = {}
    offset = 0
    for item in items:
        if type(item) is not dict:
            raise InvalidInput("each entry of 'inputs' must be a JSON object")
        name = item.get("name")
        if type(name) is not str:
            raise InvalidInput("each input needs a 'name' string")
        p = plan.inputs.get(name)
        if p is None:
            raise InvalidInput(f"unexpected input {name!r}; the model takes {plan.input_names}")
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype != p.datatype:
            raise InvalidInput(
                f"input {name!r}: datatype {datatype!r} does not match the model's {p.datatype!r}"
            )
        shape = _checked_shape(name, item.get("shape"), p)
        parameters = item.get("parameters")
        size = None
        if parameters is not None:
            if type(parameters) is not dict:
                raise InvalidInput(f"input {name!r}: 'parameters' must be a JSON object")
            if "shared_memory_region" in parameters:
                raise InvalidInput(f"input {name!r}: shared memory is not supported")
            size = parameters.get("binary_data_size")
        if size is None:
            data = item.get("data")
            if data is None:
                raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
            arrays[name] = array_from_json(
                data, datatype, shape, name=name, reject_nonfinite=reject_nonfinite
            )
            continue
        if "data" in item:
            raise InvalidInput(f"input {name!r} has both 'data' and binary_data_size")
        if binary is None:
            raise InvalidInput(
                f"input {name!r} has binary_data_size but the request has no "
                "Inference-Header-Content-Length header"
            )
        if type(size) is not int or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes of binary data left)"
            )
        arrays[name] = array_from_binary(
            binary[offset : offset + size],
            datatype,
            shape,
            name=name,
            reject_nonfinite=reject_nonfinite,
        )
        offset += size
    if binary is not None and offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary)} bytes after the JSON header but the inputs declare "
            f"{offset} (check Inference-Header-Content-Length and binary_data_size)"
        )
    if len(arrays) != len(plan.inputs):
        missing = ", ".join(repr(n) for n in plan.inputs if n not in arrays)
        raise InvalidInput(f"missing input {missing}; the model takes {plan.input_names}")
    if plan.batched and len(arrays) > 1:
        rows = {n: a.shape[0] for n, a in arrays.items()}
        if len(set(rows.values())) > 1:
            raise InvalidInput(f"inputs have different batch sizes (dim 0): {rows}")
    parameters = request.get("parameters")
    if parameters is None:
        parameters = {}
    elif type(parameters) is not dict:
        raise InvalidInput("'parameters' must be a JSON object")
    binary_default = parameters.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise InvalidInput("parameters.binary_data_output must be true or false")
    request_id = request.get("id")
    if request_id is not None and type(request_id) is not str:
        raise InvalidInput("'id' must be a string")
    outputs = request.get("outputs")
    requested = None if outputs is None else _requested(outputs, plan, binary_default)
    return InferRequest(request_id, arrays, requested, binary_default, parameters)


def _checked_shape(name: str, shape: Any, p: _InputPlan) -> list[int]:
    if type(shape) is not list:
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) == p.rank:
        for dim, expected in zip(shape, p.shape, strict=True):
            if type(dim) is not int or dim < 0 or (dim != expected and expected >= 0):
                break
        else:
            if p.rank and shape[0] == 0 and p.shape[0] == -1:
                raise InvalidInput(f"input {name!r}: shape {_fmt(shape)} has no rows")
            return shape
    if not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    raise InvalidInput(
        f"input {name!r}: expected shape {_fmt(p.shape)} {p.datatype}, got {_fmt(shape)}"
    )


def _requested(outputs: Any, plan: _Plan, binary_default: bool) -> list[RequestedOutput]:
    if type(outputs) is not list:
        raise InvalidInput("'outputs' must be a list")
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for item in outputs:
        if type(item) is not dict or type(item.get("name")) is not str:
            raise InvalidInput("each entry of 'outputs' must be an object with a 'name'")
        name = item["name"]
        if name not in plan.outputs:
            known = ", ".join(repr(n) for n in sorted(plan.outputs))
            raise InvalidInput(f"unknown output {name!r}; the model has {known}")
        if name in seen:
            raise InvalidInput(f"output {name!r} is requested twice")
        seen.add(name)
        parameters = item.get("parameters") or {}
        if type(parameters) is not dict:
            raise InvalidInput(f"output {name!r}: 'parameters' must be a JSON object")
        if "shared_memory_region" in parameters:
            raise InvalidInput(f"output {name!r}: shared memory is not supported")
        binary = parameters.get("binary_data", binary_default)
        if type(binary) is not bool:
            raise InvalidInput(f"output {name!r}: binary_data must be true or false")
        count = parameters.get("classification", 0)
        if type(count) is not int or count < 0:
            raise InvalidInput(f"output {name!r}: classification must be a non-negative integer")
        result.append(RequestedOutput(name, binary, count))
    return result


def classify(values: Array, count: int, labels: tuple[str, ...] | None = None) -> Array:
    """Top-``count`` entries of each row as ``"value:index[:label]"`` bytes, shape [rows, k].

    A 1-D output is one row; higher ranks are flattened after the batch dimension.
    """
    rows = values.reshape(1, -1) if values.ndim <= 1 else values.reshape(values.shape[0], -1)
    k = min(count, rows.shape[1])
    keys = rows.astype(np.float64) if rows.dtype.kind != "f" else rows
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    floating = rows.dtype.kind == "f" or rows.dtype.kind == "V"
    result = np.empty((rows.shape[0], k), dtype=np.object_)
    for r in range(rows.shape[0]):
        for j, index in enumerate(order[r].tolist()):
            value = rows[r, index]
            text = f"{float(value):f}" if floating else str(int(value))
            text = f"{text}:{index}"
            if labels is not None and index < len(labels):
                text = f"{text}:{labels[index]}"
            result[r, j] = text.encode()
    return result if values.ndim > 1 else result.reshape(k)


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: dict[str, Array],
    request: InferRequest,
    signature: Signature,
) -> tuple[bytes, int | None]:
    """The response body, and the ``Inference-Header-Content-Length`` when any output is binary.

    Without requested outputs every output of the signature is returned in the request's
    default form (``binary_data_output``).
    """
    plan = _plan(signature)
    requested: Sequence[RequestedOutput] | None = request.outputs
    if requested is None:
        requested = plan.default_outputs[request.binary_default]
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in requested:
        name, binary, count = output.name, output.binary, output.class_count
        array = outputs.get(name)
        if array is None:
            if name not in plan.outputs:
                known = ", ".join(repr(n) for n in sorted(plan.outputs))
                raise InvalidInput(f"unknown output {name!r}; the model has {known}")
            raise TorchopsError(f"the model returned no output {name!r}")
        if count:
            array = classify(array, count, signature.labels)
            datatype = "BYTES"
        else:
            datatype = _DATATYPE_OF.get(array.dtype) or _output_datatype(name, array)
        if binary:
            raw = binary_data(array, datatype)
            chunks.append(raw)
            entries.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
        else:
            entries.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "data": json_data(array, datatype),
                }
            )
    header = orjson.dumps(
        {
            "model_name": model_name,
            "model_version": model_version,
            "id": request_id,
            "outputs": entries,
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not chunks:
        return header, None
    chunks.insert(0, header)
    return b"".join(chunks), len(header)


def _output_datatype(name: str, array: Array) -> str:
    try:
        return datatype_of(array.dtype)
    except InvalidInput:  # the model's fault, not the client's: a 500
        raise TorchopsError(
            f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry"
        ) from None


def json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object (management and feedback calls)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in the request body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    return data


def encode_error(message: str) -> bytes:
    """The body of an error answer: ``{"error": message}``."""
    return orjson.dumps({"error": message})
