"""Start the real server as a subprocess on an ephemeral loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from _models import LABELS, Mul, Slow, classifier
from torchops.registry import Registry

START_TIMEOUT_S = 180


def register_models(home: Path, *, slow_steps: int = 0) -> None:
    """``double`` (v1 = x2 production, v2 = x3) and ``clf`` (3 labels), plus ``slow``."""
    with Registry(home) as registry:
        example = torch.ones(2, 4)
        registry.register("double", Mul(2.0), example, formats=("torchscript",))
        registry.register("double", Mul(3.0), example, formats=("torchscript",))
        registry.set_alias("double", "production", 1)
        registry.register("clf", classifier(), example, labels=LABELS, formats=("torchscript",))
        registry.set_alias("clf", "production", 1)
        if slow_steps:
            registry.register("slow", Slow(slow_steps), example, formats=("torchscript",))
            registry.set_alias("slow", "production", 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    home: Path
    port: int
    stdout: Path
    stderr: Path

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"http://{self.address}"

    @property
    def token(self) -> str:
        return (self.home / "token").read_text().strip()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(home: Path, *args: str, log_dir: Path | None = None) -> Server:
    """Run ``python -m torchops.serving`` and wait until ``/v2/health/ready`` answers 200."""
    log_dir = log_dir or home
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TORCHOPS_TOKEN"}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torchops.serving",
        *args,
        "--home",
        str(home),
        "--port",
        str(port),
        "--threads",
        "1",
    ]
    stdout, stderr = log_dir / f"server-{port}.out", log_dir / f"server-{port}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
    server = Server(process, home, port, stdout, stderr)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{server.base}/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {stderr.read_text()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s: {stderr.read_text()}")
        time.sleep(0.1)


StartServer = Callable[..., Server]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[StartServer]:
    """``launch(home, *args)`` starts a server that is stopped after the test."""
    servers: list[Server] = []

    def run(home: Path, *args: str) -> Server:
        server = start_server(home, *args, log_dir=tmp_path)
        servers.append(server)
        return server

    yield run
    for server in servers:
        if server.process.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server over ``double`` and ``clf`` for the tests that do not change the registry."""
    home = tmp_path_factory.mktemp("e2e-home")
    register_models(home)
    server = start_server(home)
    try:
        yield server
    finally:
        server.stop()
