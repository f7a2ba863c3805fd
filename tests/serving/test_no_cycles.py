"""Requests leave no reference cycles behind.

The server collects the cyclic GC's young generation only once 50,000 objects have piled
up (``torchops.serving.server._settle_gc``): a request whose objects formed a cycle would
keep its body alive until then, gigabytes for large requests. Each request here goes over
its own connection to the server's own HTTP stack, as a client without keep-alive does.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from torchops.serving.httpd import HttpProtocol, HttpServer
from torchops.serving.server import bind

from .conftest import Serve

pytestmark = pytest.mark.anyio

ROWS = [[1.0, 2.0, 3.0, 4.0]] * 2
NAN = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[NaN,1,2,3]}]}'


def _post(path: str, body: dict[str, object] | bytes) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + data


def _tensor(name: str, data: object, shape: list[int] | None = None) -> dict[str, object]:
    return {"inputs": [{"name": name, "shape": shape or [2, 4], "datatype": "FP32", "data": data}]}


REQUESTS = {
    "answered": _post("/v2/models/double/infer", _tensor("x", ROWS)),
    "NaN refused": _post("/v2/models/double/infer", NAN),
    "wrong input name": _post("/v2/models/double/infer", _tensor("y", ROWS)),
    "wrong shape": _post("/v2/models/double/infer", _tensor("x", [1.0] * 6, [2, 3])),
    "malformed JSON": _post("/v2/models/double/infer", b"{nope"),
    "unknown model": _post("/v2/models/nope/infer", _tensor("x", ROWS)),
    "unknown version": _post("/v2/models/double/versions/9/infer", _tensor("x", ROWS)),
    "model failed": _post("/v2/models/fragile/infer", _tensor("x", [[200.0] * 4] * 2)),
}


def _exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(raw)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    return reply


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Cycles made during the test stay for its own collection to find."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.enable()


def _ours(garbage: list[object]) -> list[str]:
    """The garbage that a request of ours left: connections, exceptions, torchops frames."""
    found = []
    for o in garbage:
        if isinstance(o, HttpProtocol | BaseException):
            found.append(type(o).__name__)
        elif isinstance(o, types.FrameType) and "torchops" in o.f_code.co_filename:
            found.append(f"frame of {o.f_code.co_qualname}")
    return found


async def test_requests_and_errors_leave_no_reference_cycles(
    serve: Serve, models_home: Path, no_automatic_gc: None
) -> None:
    async with serve(models_home) as (_, app):
        server = HttpServer(app)
        sock = bind("127.0.0.1", 0)
        await server.start(sock)
        port = sock.getsockname()[1]
        statuses = {}
        for name, raw in REQUESTS.items():
            for _ in range(3):
                reply = await asyncio.to_thread(_exchange, port, raw)
                statuses[name] = int(reply.split(b" ", 2)[1])
        await server.shutdown(5)
    assert statuses == {
        "answered": 200,
        "NaN refused": 400,
        "wrong input name": 400,
        "wrong shape": 400,
        "malformed JSON": 400,
        "unknown model": 404,
        "unknown version": 404,
        "model failed": 500,
    }
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = _ours(gc.garbage)
    gc.garbage.clear()
    gc.set_debug(0)
    assert found == []
