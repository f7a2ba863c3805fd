"""Cost of the OIP codec per request: decode_request + encode_response.

Prints microseconds per call for the ``mlp`` body (one row of 64 floats, 10 outputs) and
the ``cnn`` body (one 3x32x32 image, 10 outputs), JSON and binary, and the ratio to a bare
baseline measured in the same run: ``orjson.loads`` + ``np.asarray`` of the data +
``orjson.dumps`` of a response with the same output. Run: ``.venv/bin/python bench/codec.py``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import orjson

from torchops.serving.codec import decode_request, encode_response
from torchops.types import Signature, TensorSpec


def _per_call(fns: list[Callable[[], object]], seconds: float) -> list[float]:
    """Best microseconds per call of each function.

    Rounds of the functions interleave, so a neighbour's load on a shared machine hits
    the baseline and the codec alike.
    """
    counts = []
    for fn in fns:  # a loop count that takes ~5 ms per function
        n = 1
        while True:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            if time.perf_counter() - start > 0.005:
                break
            n *= 2
        counts.append(n)
    best = [float("inf")] * len(fns)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for i, (fn, n) in enumerate(zip(fns, counts, strict=True)):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / n)
    return [b * 1e6 for b in best]


def _case(
    label: str, shape: tuple[int, ...], seconds: float, rng: np.random.Generator
) -> list[str]:
    signature = Signature(
        inputs=(TensorSpec("INPUT__0", "float32", (-1, *shape[1:])),),
        outputs=(TensorSpec("OUTPUT__0", "float32", (-1, 10)),),
    )
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.standard_normal((shape[0], 10)).astype(np.float32)
    json_body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT__0",
                    "shape": list(shape),
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ]
        }
    )
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT__0",
                    "shape": list(shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    binary_body = header + x.tobytes()

    def baseline() -> object:
        data = orjson.loads(json_body)["inputs"][0]["data"]
        np.asarray(data, dtype=np.float32).reshape(shape)
        return orjson.dumps(
            {
                "model_name": "m",
                "model_version": "1",
                "id": "1",
                "outputs": [
                    {"name": "OUTPUT__0", "datatype": "FP32", "shape": [1, 10], "data": y},
                ],
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    def codec_json() -> object:
        request = decode_request(json_body, signature)
        return encode_response(
            model_name="m",
            model_version="1",
            request_id="1",
            outputs={"OUTPUT__0": y},
            request=request,
            signature=signature,
        )

    def codec_binary() -> object:
        request = decode_request(binary_body, signature, header_length=len(header))
        return encode_response(
            model_name="m",
            model_version="1",
            request_id="1",
            outputs={"OUTPUT__0": y},
            request=request,
            signature=signature,
        )

    base, js, binary = _per_call([baseline, codec_json, codec_binary], seconds)
    return [
        f"{label:4s} body {len(json_body):6d} B JSON: baseline {base:7.2f} us  "
        f"codec {js:7.2f} us  ratio {js / base:5.2f}  overhead {js - base:6.2f} us",
        f"{label:4s} body {len(binary_body):6d} B binary: codec {binary:7.2f} us "
        f"(ratio to the JSON baseline {binary / base:5.2f})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per model")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for line in _case("mlp", (1, 64), args.seconds, rng):
        print(line)
    for line in _case("cnn", (1, 3, 32, 32), args.seconds, rng):
        print(line)


if __name__ == "__main__":
    main()
