"""The app as a whole: settings options, bad input, one-line errors, the real executable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

import torchops
from torchops.cli._common import CliGroup
from torchops.errors import NotFound

from .conftest import ModelFiles, Snapshot

Cli = Callable[..., Result]
CliJson = Callable[..., Any]
EXECUTABLE = Path(sys.executable).parent / "torchops"


def _assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback (most recent call last)" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_version_and_help(cli: Cli) -> None:
    assert cli("--version").stdout.strip() == f"torchops {torchops.__version__}"
    help_text = cli("--help").stdout
    for command in ("quickstart", "register", "models", "versions", "show", "alias", "history"):
        assert command in help_text
    for command in ("export", "delete", "gc"):
        assert command in help_text


def test_home_before_the_command_and_from_the_environment(
    seeded_home: Path, tmp_path: Path, cli: Cli
) -> None:
    by_global = json.loads(cli("--home", seeded_home, "models", "--json").stdout)
    by_env = json.loads(cli("models", "--json", env={"TORCHOPS_HOME": str(seeded_home)}).stdout)
    assert [m["name"] for m in by_global] == [m["name"] for m in by_env] == ["tiny"]
    # the command's own option wins over the global one
    empty = tmp_path / "empty"
    inner = json.loads(cli("--home", seeded_home, "models", "--home", empty, "--json").stdout)
    assert inner == []


def test_registry_url_selects_the_database(
    seeded_home: Path, tmp_path: Path, cli: Cli, cli_json: CliJson
) -> None:
    url = f"sqlite:///{seeded_home / 'registry.db'}"
    found = cli_json("models", "--registry-url", url, "--home", tmp_path)
    assert [m["name"] for m in found] == ["tiny"]
    env = {"TORCHOPS_REGISTRY_URL": url, "TORCHOPS_HOME": str(tmp_path)}
    assert json.loads(cli("models", "--json", env=env).stdout)[0]["name"] == "tiny"


@pytest.mark.postgres
def test_registry_url_on_postgresql(
    postgres_server: Any, tmp_path: Path, model_files: ModelFiles, cli: Cli, cli_json: CliJson
) -> None:
    url = postgres_server.create_database()
    try:
        registered = cli(
            "--registry-url", url, "register", "tiny", model_files.model,
            "--example", model_files.example, "--format", "torchscript", "--home", tmp_path,
        )  # fmt: skip
        assert registered.exit_code == 0, registered.stderr
        cli_json("--registry-url", url, "alias", "tiny", "production", "1", "--home", tmp_path)
        (info,) = cli_json("--registry-url", url, "models", "--home", tmp_path)
        assert info["aliases"] == {"production": 1}
        assert not (tmp_path / "registry.db").exists()
    finally:
        postgres_server.drop_database(url)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["show", "nope"], "nope"),
        (["show", "tiny:9"], "9"),
        (["show", "tiny@nope"], "nope"),
        (["show", "a:b:c"], "a:b:c"),
        (["versions", "nope"], "nope"),
        (["history", "nope"], "nope"),
        (["history", "tiny", "--at", "yesterday"], "yesterday"),
        (["alias", "tiny", "production", "7"], "7"),
        (["alias", "tiny", "../x", "1"], "../x"),
        (["alias", "tiny", "production"], "VERSION"),
        (["export", "tiny:1", "--format", "tflite"], "tflite"),
        (["export", "nope:1", "--format", "onnx"], "nope"),
        (["delete", "tiny"], "--yes"),
        (["delete", "tiny:9"], "9"),
        (["delete", "a:b:c"], "a:b:c"),
    ],
)
def test_bad_input_fails_in_one_line_and_changes_nothing(
    home: Path, cli: Cli, store_snapshot: Snapshot, args: list[str], fragment: str
) -> None:
    before = store_snapshot(home)
    _assert_one_line_error(cli(*args, "--home", home), fragment)
    assert store_snapshot(home) == before


@pytest.mark.parametrize(
    ("name", "model", "example", "extra", "fragment"),
    [
        ("../x", "model", "example", [], "../x"),
        ("tiny", "pickled_model", "example", [], "TorchScript"),
        ("tiny", "junk", "example", [], "TorchScript"),
        ("tiny", "model", "wrong_example", [], "[5, 3]"),
        ("tiny", "model", "junk", [], "junk.pt"),
        ("tiny", "model", "example", ["--format", "tflite"], "tflite"),
        ("tiny", "model", "example", ["--task", "ranking"], "ranking"),
        ("tiny", "model", "example", ["--labels", "a,b"], "2 labels"),
        ("tiny", "model", "example", ["--labels", "a,,c"], "a,,c"),
        ("tiny", "model", "example", ["--reference", "{wrong_example}"], "reference"),
        ("tiny", "model", "example", ["--tag", "novalue"], "novalue"),
        ("tiny", "model", "example", ["--metric", "accuracy=high"], "high"),
        ("tiny", "missing", "example", [], "not found"),
    ],
)
def test_register_bad_input_fails_in_one_line_and_changes_nothing(
    home: Path,
    model_files: ModelFiles,
    cli: Cli,
    store_snapshot: Snapshot,
    name: str,
    model: str,
    example: str,
    extra: list[str],
    fragment: str,
) -> None:
    before = store_snapshot(home)
    model_path = getattr(model_files, model, model_files.model.parent / "missing.pt")
    example_path = getattr(model_files, example)
    extra = [e.format(wrong_example=model_files.wrong_example) for e in extra]
    result = cli(
        "register", name, model_path, "--example", example_path, "--home", home, *extra
    )  # fmt: skip
    _assert_one_line_error(result, fragment)
    assert store_snapshot(home) == before


def _failing_app() -> typer.Typer:
    app = typer.Typer(cls=CliGroup)

    @app.command()
    def boom() -> None:
        raise ValueError("first line\nsecond line")

    @app.command()
    def missing() -> None:
        raise NotFound("model 'x' not found")

    return app


def test_unexpected_errors_are_one_line_unless_debugging() -> None:
    app = _failing_app()
    quiet = CliRunner().invoke(app, ["boom"])
    assert quiet.exit_code == 1
    assert quiet.stderr == "error: unexpected ValueError: first line second line\n"
    loud = CliRunner().invoke(app, ["boom"], env={"TORCHOPS_DEBUG": "1"})
    assert loud.exit_code == 1
    assert "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.splitlines()[-1] == "error: unexpected ValueError: first line second line"
    expected = CliRunner().invoke(app, ["missing"])
    assert (expected.exit_code, expected.stderr) == (1, "error: model 'x' not found\n")


def test_a_home_that_is_a_file_is_refused(tmp_path: Path, cli: Cli) -> None:
    home = tmp_path / "file"
    home.write_text("not a folder")
    _assert_one_line_error(cli("models", "--home", home), "is a file")


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TORCHOPS_")}
    return subprocess.run(
        [str(EXECUTABLE), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=300,
        check=False,
    )


def test_the_installed_command_succeeds_with_json(seeded_home: Path) -> None:
    done = _run("versions", "tiny", "--json", env={"TORCHOPS_HOME": str(seeded_home)})
    assert done.returncode == 0, done.stderr
    assert [v["version"] for v in json.loads(done.stdout)] == [1, 2]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["show", "a:b:c"], "invalid model reference"),
        (["show", "nope"], "nope"),
        (["register", "tiny", "{junk}", "--example", "{example}"], "TorchScript"),
        (["register", "tiny", "{model}", "--example", "{wrong}"], "cannot be multiplied"),
    ],
)
def test_the_installed_command_fails_in_one_line(
    home: Path, model_files: ModelFiles, args: list[str], fragment: str
) -> None:
    paths = {
        "junk": model_files.junk,
        "example": model_files.example,
        "model": model_files.model,
        "wrong": model_files.wrong_example,
    }
    filled = [a.format(**paths) for a in args]
    done = _run(*filled, "--home", home)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert fragment in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr) < 400, done.stderr  # the gist, not the TorchScript traceback
    assert done.stdout == ""


def test_usage_errors_exit_with_2(cli: Cli) -> None:
    assert cli("show").exit_code == 2
    assert cli("frobnicate").exit_code == 2
