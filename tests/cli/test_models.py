"""The registry commands, driven in-process with typer's CliRunner."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import Result

from torchops.registry import ArtifactStore, Registry

from .conftest import ModelFiles, Snapshot

Cli = Callable[..., Result]
CliJson = Callable[..., Any]


def test_register_records_every_format_and_the_metadata(
    seeded_home: Path, cli_json: CliJson
) -> None:
    v1 = cli_json("show", "tiny:1", "--home", seeded_home)
    assert v1["name"] == "tiny" and v1["version"] == 1
    assert v1["task"] == "classification"
    assert v1["signature"]["labels"] == ["a", "b", "c"]
    assert v1["signature"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert v1["tags"] == {"team": "vision", "stage": "test"}
    assert v1["metrics"] == {"accuracy": 0.5}
    assert v1["description"] == "a tiny classifier"
    assert {"torchscript", "exported", "onnx", "weights", "example", "reference"} <= set(
        v1["artifacts"]
    )
    assert v1["aliases"] == ["production"]
    datetime.fromisoformat(v1["created_at"])
    v2 = cli_json("show", "tiny:2", "--home", seeded_home)
    assert "onnx" not in v2["artifacts"] and "torchscript" in v2["artifacts"]
    assert "reference" not in v2["artifacts"]


def test_register_prints_the_version_and_the_parity_table(
    tmp_path: Path, model_files: ModelFiles, cli: Cli
) -> None:
    result = cli(
        "register", "tiny", model_files.model, "--example", model_files.example,
        "--format", "torchscript", "--home", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "Registered tiny:1" in result.stdout
    assert "torchscript" in result.stdout and "ok" in result.stdout
    with Registry(tmp_path) as registry:
        runtime = registry.load("tiny:1")
        example = np.load(model_files.example)
        assert runtime.predict(example).shape == (5, 3)  # type: ignore[union-attr]


def test_register_json_is_the_model_version(
    tmp_path: Path, model_files: ModelFiles, cli_json: CliJson
) -> None:
    data = cli_json(
        "register", "tiny", model_files.model, "--example", model_files.example,
        "--format", "torchscript", "--task", "regression", "--home", tmp_path,
    )  # fmt: skip
    assert data["version"] == 1 and data["task"] == "regression"
    reports = data["details"]["reports"]
    assert [r["format"] for r in reports if r["ok"]] == ["torchscript"]


def test_models_lists_models(seeded_home: Path, cli: Cli, cli_json: CliJson) -> None:
    (info,) = cli_json("models", "--home", seeded_home)
    assert info["name"] == "tiny"
    assert info["latest_version"] == 2 and info["version_count"] == 2
    assert info["aliases"] == {"production": 1}
    table = cli("models", "--home", seeded_home)
    assert table.exit_code == 0
    assert "tiny" in table.stdout and "production→v1" in table.stdout


def test_models_on_an_empty_store(tmp_path: Path, cli: Cli, cli_json: CliJson) -> None:
    assert cli_json("models", "--home", tmp_path) == []
    assert "No models registered" in cli("models", "--home", tmp_path).stdout


def test_versions_lists_every_version(seeded_home: Path, cli: Cli, cli_json: CliJson) -> None:
    found = cli_json("versions", "tiny", "--home", seeded_home)
    assert [v["version"] for v in found] == [1, 2]
    assert found[0]["aliases"] == ["production"] and found[1]["aliases"] == []
    table = cli("versions", "tiny", "--home", seeded_home).stdout
    assert "v1" in table and "v2" in table and "production" in table


@pytest.mark.parametrize(("ref", "version"), [("tiny", 1), ("tiny:2", 2), ("tiny@production", 1)])
def test_show_resolves_references(
    seeded_home: Path, cli: Cli, cli_json: CliJson, ref: str, version: int
) -> None:
    assert cli_json("show", ref, "--home", seeded_home)["version"] == version
    text = cli("show", ref, "--home", seeded_home).stdout
    assert f"tiny:{version}" in text and "Signature" in text and "Artifacts" in text


def test_alias_moves_and_history_records_it(home: Path, cli: Cli, cli_json: CliJson) -> None:
    event = cli_json("alias", "tiny", "production", "2", "--reason", "better", "--home", home)
    assert event == {
        "name": "tiny",
        "alias": "production",
        "from_version": 1,
        "to_version": 2,
        "at": event["at"],
        "actor": event["actor"],
        "reason": "better",
    }
    assert cli_json("show", "tiny", "--home", home)["version"] == 2
    staged = cli("alias", "tiny", "staging", "1", "--home", home)
    assert staged.exit_code == 0 and "tiny@staging → v1" in staged.stdout

    events = cli_json("history", "tiny", "--home", home)
    assert [(e["alias"], e["from_version"], e["to_version"]) for e in events] == [
        ("production", None, 1),
        ("production", 1, 2),
        ("staging", None, 1),
    ]
    only = cli_json("history", "tiny", "--alias", "staging", "--home", home)
    assert [e["alias"] for e in only] == ["staging"]
    table = cli("history", "tiny", "--home", home).stdout
    assert "better" in table and "staging" in table


def test_history_at_answers_which_version_an_alias_pointed_to(
    home: Path, cli: Cli, cli_json: CliJson
) -> None:
    first_move = datetime.fromisoformat(cli_json("history", "tiny", "--home", home)[0]["at"])
    cli_json("alias", "tiny", "production", "2", "--home", home)
    now = datetime.now(UTC) + timedelta(seconds=1)
    early = (first_move - timedelta(seconds=1)).isoformat()
    between = cli_json("history", "tiny", "--alias", "production", "--at", early, "--home", home)
    assert between == [{"name": "tiny", "alias": "production", "at": early, "version": None}]
    latest = cli_json("history", "tiny", "--at", now.isoformat(), "--home", home)
    assert [(a["alias"], a["version"]) for a in latest] == [("production", 2)]
    # a naive time is read as UTC
    naive = now.replace(tzinfo=None).isoformat()
    assert cli_json("history", "tiny", "--at", naive, "--home", home)[0]["version"] == 2
    text = cli("history", "tiny", "--at", now.isoformat(), "--home", home).stdout
    assert "tiny@production pointed to v2" in text


def test_alias_remove(home: Path, cli: Cli, cli_json: CliJson) -> None:
    event = cli_json(
        "alias", "tiny", "production", "--remove", "--reason", "retired", "--home", home
    )
    assert event["from_version"] == 1 and event["to_version"] is None
    assert cli_json("models", "--home", home)[0]["aliases"] == {}
    # with no alias left, the bare name means the latest version
    assert cli_json("show", "tiny", "--home", home)["version"] == 2


def test_export_derives_a_missing_format_and_writes_it(
    home: Path, tmp_path: Path, cli: Cli, cli_json: CliJson
) -> None:
    out = tmp_path / "tiny.onnx"
    report = cli_json("export", "tiny:2", "--format", "onnx", "--output", out, "--home", home)
    assert report["format"] == "onnx" and report["ok"] is True
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] < 1e-4
    assert report["output"] == str(out)
    stored = cli_json("show", "tiny:2", "--home", home)["artifacts"]["onnx"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == stored["sha256"]
    import onnx

    onnx.checker.check_model(onnx.load_from_string(out.read_bytes()))
    again = cli("export", "tiny:2", "--format", "onnx", "--home", home)
    assert again.exit_code == 0 and "onnx" in again.stdout


def test_delete_a_version(home: Path, cli: Cli, cli_json: CliJson) -> None:
    deleted = cli_json("delete", "tiny:2", "--home", home)
    assert deleted == {"name": "tiny", "version": 2}
    assert [v["version"] for v in cli_json("versions", "tiny", "--home", home)] == [1]


def test_delete_refuses_a_version_an_alias_points_to(
    home: Path, cli: Cli, cli_json: CliJson, store_snapshot: Snapshot
) -> None:
    before = store_snapshot(home)
    refused = cli("delete", "tiny@production", "--home", home)
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "--force" in refused.stderr
    assert store_snapshot(home) == before
    forced = cli("delete", "tiny:1", "--force", "--home", home)
    assert forced.exit_code == 0 and "Deleted tiny:1" in forced.stdout
    assert cli_json("models", "--home", home)[0]["aliases"] == {}


def test_delete_a_whole_model_needs_yes(
    home: Path, cli: Cli, cli_json: CliJson, store_snapshot: Snapshot
) -> None:
    before = store_snapshot(home)
    unconfirmed = cli("delete", "tiny", "--home", home)
    assert unconfirmed.exit_code == 1 and "--yes" in unconfirmed.stderr
    assert store_snapshot(home) == before
    assert cli_json("delete", "tiny", "--yes", "--force", "--home", home) == {
        "name": "tiny",
        "version": None,
    }
    assert cli_json("models", "--home", home) == []
    assert not [p for p in (home / "artifacts").rglob("*") if p.is_file()]


def test_gc_removes_blobs_nothing_references(home: Path, cli: Cli, cli_json: CliJson) -> None:
    stray = ArtifactStore(str(home / "artifacts"))
    digest = stray.put(b"a blob no version references")
    assert cli_json("gc", "--home", home) == {"removed": 1, "freed_bytes": 28}
    assert not stray.exists(digest)
    assert cli_json("show", "tiny:1", "--home", home)["version"] == 1
    text = cli("gc", "--home", home)
    assert text.exit_code == 0 and "Removed 0 unreferenced blobs" in text.stdout


def test_alias_to_the_same_version_records_nothing(home: Path, cli: Cli, cli_json: CliJson) -> None:
    again = cli("alias", "tiny", "production", "1", "--home", home)
    assert again.exit_code == 0 and "already points to v1" in again.stdout
    assert len(cli_json("history", "tiny", "--home", home)) == 1


def test_register_a_two_input_model_from_npz(tmp_path: Path, cli: Cli, cli_json: CliJson) -> None:
    class Pair(torch.nn.Module):
        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return left * 2 + right.sum(dim=1, keepdim=True)

    model = tmp_path / "pair.pt"
    torch.jit.script(Pair()).save(str(model))
    rng = np.random.default_rng(1)
    example = tmp_path / "example.npz"
    np.savez(
        example,
        left=rng.random((3, 2), dtype=np.float32),
        right=rng.random((3, 5), dtype=np.float32),
    )
    data = cli_json(
        "register", "pair", model, "--example", example, "--format", "torchscript",
        "--home", tmp_path / "home",
    )  # fmt: skip
    inputs = {spec["name"]: spec["shape"] for spec in data["signature"]["inputs"]}
    assert inputs == {"left": [-1, 2], "right": [-1, 5]}
    with Registry(tmp_path / "home") as registry:
        assert set(registry.example("pair")) == {"left", "right"}


def test_user_text_is_printed_literally(tmp_path: Path, model_files: ModelFiles, cli: Cli) -> None:
    text = "[red]literal[/] [/oops]"
    registered = cli(
        "register", "tiny", model_files.model, "--example", model_files.example,
        "--format", "torchscript", "--description", text, "--tag", f"note={text}",
        "--home", tmp_path,
    )  # fmt: skip
    assert registered.exit_code == 0, registered.stderr
    shown = cli("show", "tiny", "--home", tmp_path)
    assert shown.exit_code == 0, shown.stderr
    assert text in shown.stdout and f"note={text}" in shown.stdout
