"""The real server process: HTTP edge cases, hot swaps under load, shutdown, workers."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from torchops.registry import Registry

from .conftest import Server, StartServer, register_models

X = np.arange(8, dtype=np.float32).reshape(2, 4)
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
).encode()
K = {"1": 2.0, "2": 3.0}  # double's versions multiply by these


def raw_exchange(server: Server, payload: bytes, *, read_until_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(payload)
        if not read_until_close:
            return sock.recv(65536)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_pipelined_requests_are_answered_in_order(shared_server: Server) -> None:
    request = (
        b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (len(BODY), BODY)
    )
    last = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(shared_server, request * 3 + last)
    statuses = re.findall(rb"HTTP/1.1 (\d{3})", answer)
    assert statuses == [b"200", b"200", b"200", b"200"]
    assert answer.count(b'"model_version":"1"') == 3
    assert answer.rstrip().endswith(b'{"live":true}')


def test_expect_continue_and_chunked_body(shared_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(BODY)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        half = len(BODY) // 2
        sock.sendall(
            b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (half, BODY[:half], len(BODY) - half, BODY[half:])
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in answer.lower()


def test_oversized_and_malformed_requests(shared_server: Server) -> None:
    too_big = raw_exchange(
        shared_server,
        b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n",
    )
    assert too_big.startswith(b"HTTP/1.1 413")
    assert b'"error"' in too_big
    huge_headers = raw_exchange(
        shared_server,
        b"GET /v2 HTTP/1.1\r\nHost: t\r\n" + b"X-Filler: " + b"a" * 70_000 + b"\r\n\r\n",
    )
    assert huge_headers.startswith(b"HTTP/1.1 400") and b"headers" in huge_headers
    garbage = raw_exchange(shared_server, b"NOT HTTP AT ALL\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400")
    old = raw_exchange(shared_server, b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    assert old.startswith(b"HTTP/1.1 200") and b"connection: close" in old.lower()
    # a HEAD request gets headers only
    head = raw_exchange(shared_server, b"HEAD /v2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 ") and head.endswith(b"\r\n\r\n")


def _hammer(port: int, stop: threading.Event, seen: list[tuple[int, str, float]]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        try:
            connection.request("POST", "/v2/models/double/infer", BODY)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            seen.append((-1, repr(exc), 0.0))
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        if response.status != 200:
            seen.append((response.status, payload.decode(errors="replace"), 0.0))
            continue
        body = json.loads(payload)
        seen.append((200, body["model_version"], float(body["outputs"][0]["data"][1])))
    connection.close()


def test_hot_swap_under_load_fails_no_request(tmp_path: Path, launch: StartServer) -> None:
    home = tmp_path / "home"
    register_models(home)
    server = launch(home, "--poll-interval", "0.05", "--calibrate-s", "0")
    stop = threading.Event()
    seen: list[list[tuple[int, str, float]]] = [[] for _ in range(6)]
    threads = [
        threading.Thread(target=_hammer, args=(server.port, stop, s), daemon=True) for s in seen
    ]
    for thread in threads:
        thread.start()
    flips = ["2", "1", "2", "1", "2", "1"]
    try:
        with Registry(home) as registry:
            for target in flips:
                registry.set_alias("double", "production", int(target))
                marks = [len(s) for s in seen]
                deadline = time.monotonic() + 60
                # wait until the load actually reaches the new version
                while not any(
                    r[1] == target for s, m in zip(seen, marks, strict=True) for r in s[m:]
                ):
                    assert time.monotonic() < deadline, f"never switched to version {target}"
                    time.sleep(0.01)
                time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    results = [r for s in seen for r in s]
    failures = [r for r in results if r[0] != 200]
    assert failures == []
    versions = Counter(r[1] for r in results)
    assert set(versions) == {"1", "2"}
    # every answer matches the version it says answered it: data[1] is x[0,1] * k = 1 * k
    assert all(r[2] == K[r[1]] for r in results)
    assert len(results) > 100


def test_sigterm_finishes_requests_in_flight(tmp_path: Path, launch: StartServer) -> None:
    home = tmp_path / "home"
    register_models(home, slow_steps=30000)
    server = launch(home, "--calibrate-s", "0", "--access-log")
    outcome: dict[str, object] = {}

    def slow_request() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("POST", "/v2/models/slow/infer", BODY)
        response = connection.getresponse()
        outcome["status"] = response.status
        outcome["body"] = json.loads(response.read())

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 60
    while True:  # wait until the request is running inside the server
        with urllib.request.urlopen(f"{server.base}/metrics") as response:
            text = response.read().decode()
        if 'torchops_inflight_requests{model="slow",version="1"} 1.0' in text:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.stop() == 0
    thread.join(60)
    assert outcome["status"] == 200
    assert outcome["body"]["model_version"] == "1"  # type: ignore[index]
    # --access-log: one JSON line per request, with its id
    records = [
        json.loads(line) for line in server.stderr.read_text().splitlines() if line[:1] == "{"
    ]
    infer = [r for r in records if r.get("model") == "slow"]
    assert infer and infer[0]["status"] == 200
    assert infer[0]["id"] == outcome["body"]["id"]  # type: ignore[index]
    assert any(r.get("path") == "/metrics" for r in records)


def test_workers_share_the_port(tmp_path: Path, launch: StartServer) -> None:
    home = tmp_path / "home"
    register_models(home)
    server = launch(home, "--workers", "2", "--calibrate-s", "0")
    for _ in range(20):
        request = urllib.request.Request(f"{server.base}/v2/models/double/infer", data=BODY)
        with urllib.request.urlopen(request) as response:
            assert json.loads(response.read())["model_version"] == "1"
    assert server.stop() == 0


@pytest.mark.parametrize("stack", ["uvicorn"])
def test_the_app_also_runs_under_uvicorn(tmp_path: Path, launch: StartServer, stack: str) -> None:
    home = tmp_path / "home"
    register_models(home)
    server = launch(home, f"--http={stack}", "--calibrate-s", "0")
    request = urllib.request.Request(f"{server.base}/v2/models/double/infer", data=BODY)
    with urllib.request.urlopen(request) as response:
        body = json.loads(response.read())
    np.testing.assert_allclose(body["outputs"][0]["data"], (X * 2).ravel())
    # uvicorn drains, then re-raises the signal it caught, so the exit is "killed by SIGTERM"
    assert server.stop() in (0, -15)
