"""``torchops feedback``: labels from CSV or Parquet, into the store or to a running server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import Result

from torchops.cli.feedback import read_feedback
from torchops.errors import Conflict, InvalidInput, NotFound, Unauthorized, Unavailable
from torchops.monitoring import FeedbackClient
from torchops.monitoring.observations import Observation, ObservationStore, ObservationWriter
from torchops.registry import Registry
from torchops.registry.store import utcnow

Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHOPS_TOKEN", raising=False)


def _observe(home: Path, ids: list[str], model: str = "tiny") -> None:
    with Registry(home) as registry:
        writer = ObservationWriter(registry.engine)
        for i, request_id in enumerate(ids):
            writer.put(
                Observation(
                    request_id, model, 1, utcnow(), 0.001,
                    {"output": np.zeros((1, 3), np.float32)},
                    {"x": np.full((1, 4), i, np.float32)},
                    i % 3, None,
                )
            )  # fmt: skip
        writer.close()


def _labels(home: Path, model: str = "tiny") -> dict[str, object]:
    with Registry(home) as registry:
        page = ObservationStore(registry.engine).labelled(model, arrays=False)
        return {o.request_id: o.label for o in page.observations}


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "id,target") -> Path:
    path.write_text("\n".join([header, *(f"{a},{b}" for a, b in rows)]) + "\n")
    return path


def test_csv_into_the_store_with_rejected_rows_listed(cli: Cli, home: Path, tmp_path: Path) -> None:
    _observe(home, [f"r{i}" for i in range(6)])
    file = _csv(
        tmp_path / "labels.csv",
        [("r0", "0"), ("r1", "b"), ("r2", "2"), ("r3", "7"), ("ghost", "1"), ("r4", "c")],
    )
    result = cli("feedback", "tiny", file, "--home", home)
    assert result.exit_code == 1
    assert "accepted 4, rejected 2 of 6 labels (the registry database)" in result.stdout
    assert "row 4 (id 'r3')" in result.stdout and "out of range" in result.stdout
    assert "row 5 (id 'ghost')" in result.stdout and "no prediction" in result.stdout
    assert _labels(home) == {"r0": 0, "r1": 1, "r2": 2, "r4": 2}

    again = cli("feedback", "tiny", file, "--home", home, "--json")
    assert again.exit_code == 1
    data = json.loads(again.stdout)
    assert data["accepted"] == 0 and data["rejected"] == 6
    assert sum("already given" in e["error"] for e in data["errors"]) == 4
    assert _labels(home) == {"r0": 0, "r1": 1, "r2": 2, "r4": 2}  # nothing stored twice


def test_parquet_into_the_store(cli: Cli, home: Path, tmp_path: Path) -> None:
    ids = [f"p{i}" for i in range(5)]
    _observe(home, ids)
    file = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"id": ids, "target": [0, 1, 2, 1, 0]}), file)
    result = cli("feedback", "tiny", file, "--home", home, "--batch-size", "2")
    assert result.exit_code == 0, result.stdout
    assert "accepted 5, rejected 0 of 5" in result.stdout
    assert _labels(home) == dict(zip(ids, [0, 1, 2, 1, 0], strict=True))


def test_csv_cells_are_json_numbers_and_lists_unless_by_label(tmp_path: Path) -> None:
    rows = [("a", "1"), ("b", "x"), ("c", '"[1.5, 2]"'), ("d", "2.5"), ("e", "true")]
    file = _csv(tmp_path / "l.csv", rows)
    assert read_feedback(file) == [("a", 1), ("b", "x"), ("c", [1.5, 2]), ("d", 2.5), ("e", "true")]
    assert read_feedback(file, by_label=True) == [
        ("a", "1"), ("b", "x"), ("c", "[1.5, 2]"), ("d", "2.5"), ("e", "true"),
    ]  # fmt: skip


def test_by_label_sends_class_labels(cli: Cli, home: Path, tmp_path: Path) -> None:
    _observe(home, ["r0", "r1"])
    file = _csv(tmp_path / "l.csv", [("r0", "1"), ("r1", "c")])
    result = cli("feedback", "tiny", file, "--home", home, "--by-label", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["accepted"] == 1
    assert [(e["row"], e["id"]) for e in data["errors"]] == [(1, "r0")]
    assert "unknown class label '1'" in data["errors"][0]["error"]
    assert _labels(home) == {"r1": 2}


def test_bad_files_and_models_store_nothing(cli: Cli, home: Path, tmp_path: Path) -> None:
    _observe(home, ["r0"])
    wrong = _csv(tmp_path / "wrong.csv", [("r0", "0")], header="request,label")
    result = cli("feedback", "tiny", wrong, "--home", home)
    assert result.exit_code == 1
    assert "needs columns id and target" in result.stderr and "'request'" in result.stderr
    missing = cli("feedback", "tiny", tmp_path / "absent.csv", "--home", home)
    assert missing.exit_code == 1 and "not found" in missing.stderr
    empty = _csv(tmp_path / "empty.csv", [])
    assert "no rows" in cli("feedback", "tiny", empty, "--home", home).stderr
    fine = _csv(tmp_path / "fine.csv", [("r0", "0")])
    unknown = cli("feedback", "nope", fine, "--home", home)
    assert unknown.exit_code == 1 and "nope" in unknown.stderr
    assert _labels(home) == {}


def test_read_feedback_rejects_a_broken_parquet_file(tmp_path: Path) -> None:
    file = tmp_path / "broken.parquet"
    file.write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(InvalidInput, match="not a readable Parquet file"):
        read_feedback(file)


# -- against a running server -----------------------------------------------------------


@dataclass
class Server:
    url: str
    home: Path
    process: subprocess.Popen[bytes]

    @property
    def token(self) -> str:
        return (self.home / "token").read_text().strip()

    def infer(self, rows: int) -> str:
        x = np.random.default_rng(rows).random((rows, 4), dtype=np.float32)
        tensor = {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": x.ravel().tolist()}
        response = httpx.post(f"{self.url}/v2/models/tiny/infer", json={"inputs": [tensor]})
        assert response.status_code == 200, response.text
        request_id: str = response.json()["id"]
        return request_id

    def quality(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        response = httpx.get(f"{self.url}/v2/models/tiny/quality", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, seeded_home: Path) -> Iterator[Server]:
    """``torchops serve tiny`` in a subprocess on a free loopback port."""
    home = tmp_path_factory.mktemp("served") / "home"
    shutil.copytree(seeded_home, home)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (home.parent / "server.log").open("wb")
    command = [
        sys.executable, "-m", "torchops.serving", "tiny", "--home", str(home),
        "--port", str(port), "--threads", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHOPS_")}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", home, process)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (home.parent / "server.log").read_text()
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_csv_to_a_running_server(cli: Cli, server: Server, tmp_path: Path) -> None:
    request_id = server.infer(3)
    before = server.quality()["windows"]["cumulative"]["count"]
    rows = [(f"{request_id}/0", "a"), (f"{request_id}/1", "2"), (f"{request_id}/2", "zz"),
            ("ghost", "1")]  # fmt: skip
    file = _csv(tmp_path / "labels.csv", rows)
    # the token comes from HOME/token when not given
    result = cli("feedback", "tiny", file, "--url", server.url, "--home", server.home)
    assert result.exit_code == 1, result.stderr
    assert f"accepted 2, rejected 2 of 4 labels ({server.url})" in result.stdout
    assert "row 3" in result.stdout and "unknown class label 'zz'" in result.stdout
    assert "row 4 (id 'ghost')" in result.stdout
    assert server.quality()["windows"]["cumulative"]["count"] == before + 2


def test_a_wrong_token_is_refused_and_nothing_is_stored(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    request_id = server.infer(1)
    before = server.quality()["windows"]["cumulative"]["count"]
    file = _csv(tmp_path / "labels.csv", [(request_id, "b")])
    args = ("feedback", "tiny", file, "--url", server.url, "--home", server.home)
    refused = cli(*args, "--token", "not-the-token")
    assert refused.exit_code == 1
    assert "answered 401" in refused.stderr
    assert server.quality()["windows"]["cumulative"]["count"] == before
    accepted = cli(*args, "--json", env={"TORCHOPS_TOKEN": server.token})
    assert accepted.exit_code == 0, accepted.stderr
    assert json.loads(accepted.stdout) == {"accepted": 1, "rejected": 0, "errors": []}


def test_feedback_client_by_id_in_batches_and_with_inputs(server: Server) -> None:
    first, second = server.infer(1), server.infer(2)
    before = server.quality()["windows"]["cumulative"]["count"]
    with FeedbackClient(server.url, server.token, batch_size=1) as client:
        client.send("tiny", first, "c")
        with pytest.raises(Conflict, match="already given"):
            client.send("tiny", first, "a")
        with pytest.raises(NotFound, match="ghost"):
            client.send("tiny", "ghost", 0)
        with pytest.raises(InvalidInput, match="out of range"):
            client.send("tiny", f"{second}/0", 5)
        result = client.send_many("tiny", [(f"{second}/0", 0), ("ghost", 1), (f"{second}/1", 1)])
        assert result.accepted == 2
        assert [i for i, _ in result.errors] == [1]  # indices into the whole list
        x = np.random.default_rng(7).random((3, 4), dtype=np.float32)
        ids = client.send_inputs("tiny", x, ["a", 1, np.int64(2)])
        assert len(ids) == 3 and len(set(ids)) == 3
        with pytest.raises(InvalidInput, match="2 targets for 3 input rows"):
            client.send_inputs("tiny", {"x": x}, [0, 1])
    assert server.quality()["windows"]["cumulative"]["count"] == before + 6
    with (
        FeedbackClient(server.url, "wrong") as client,
        pytest.raises(Unauthorized, match="pass the server's token"),
    ):
        client.send("tiny", first, 0)
    with pytest.raises(Unavailable, match="cannot reach"):
        FeedbackClient("http://127.0.0.1:9", "t").send("tiny", "x", 0)
