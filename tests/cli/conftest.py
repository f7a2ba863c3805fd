"""Fixtures for driving the ``torchops`` command: model files and a seeded store."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner, Result

from torchops.cli import app


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@dataclass(frozen=True)
class ModelFiles:
    model: Path  # a TorchScript archive of TinyClassifier
    example: Path  # float32 [5, 4]
    reference: Path  # float32 [40, 4]
    wrong_example: Path  # float32 [5, 3]
    pickled_model: Path  # torch.save of the eager module: a pickle, not TorchScript
    junk: Path  # random bytes


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "TORCHOPS_HOME",
        "TORCHOPS_REGISTRY_URL",
        "TORCHOPS_ARTIFACT_URL",
        "TORCHOPS_DEBUG",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    folder = tmp_path_factory.mktemp("model-files")
    torch.manual_seed(0)
    module = TinyClassifier().eval()
    files = ModelFiles(
        model=folder / "tiny.pt",
        example=folder / "example.npy",
        reference=folder / "reference.npy",
        wrong_example=folder / "wrong.npy",
        pickled_model=folder / "pickled.pt",
        junk=folder / "junk.pt",
    )
    torch.jit.script(module).save(str(files.model))
    rng = np.random.default_rng(0)
    np.save(files.example, rng.random((5, 4), dtype=np.float32))
    np.save(files.reference, rng.random((40, 4), dtype=np.float32))
    np.save(files.wrong_example, rng.random((5, 3), dtype=np.float32))
    torch.save(module, files.pickled_model)
    files.junk.write_bytes(rng.bytes(2048))
    return files


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process; exceptions are the CLI's to handle, so none may escape."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
    return result


def invoke_json(*args: str | Path) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def seeded_home(tmp_path_factory: pytest.TempPathFactory, model_files: ModelFiles) -> Path:
    """A store with model ``tiny``: v1 in every format with production → v1, v2 TorchScript only."""
    home = tmp_path_factory.mktemp("seeded") / "home"
    first = invoke(
        "register", "tiny", model_files.model, "--example", model_files.example,
        "--labels", "a,b,c", "--reference", model_files.reference,
        "--tag", "team=vision", "--tag", "stage=test", "--metric", "accuracy=0.5",
        "--description", "a tiny classifier", "--home", home,
    )  # fmt: skip
    assert first.exit_code == 0, first.stderr
    second = invoke(
        "register", "tiny", model_files.model, "--example", model_files.example,
        "--format", "torchscript", "--home", home,
    )  # fmt: skip
    assert second.exit_code == 0, second.stderr
    moved = invoke("alias", "tiny", "production", "1", "--reason", "first", "--home", home)
    assert moved.exit_code == 0, moved.stderr
    return home


@pytest.fixture
def home(tmp_path: Path, seeded_home: Path) -> Path:
    """A private copy of the seeded store."""
    target = tmp_path / "home"
    shutil.copytree(seeded_home, target)
    return target


def snapshot(home: Path) -> tuple[Any, ...]:
    """Everything a failed command must leave unchanged: metadata and stored files."""
    files = (
        sorted(
            (str(p.relative_to(home)), p.stat().st_size)
            for p in (home / "artifacts").rglob("*")
            if p.is_file()
        )
        if (home / "artifacts").exists()
        else []
    )
    models = invoke_json("models", "--home", home)
    versions = [invoke_json("versions", m["name"], "--home", home) for m in models]
    history = [invoke_json("history", m["name"], "--home", home) for m in models]
    return models, versions, history, files


Snapshot = Callable[[Path], tuple[Any, ...]]


@pytest.fixture
def store_snapshot() -> Snapshot:
    return snapshot


@pytest.fixture
def cli() -> Callable[..., Result]:
    """``cli("models", "--home", home)`` runs the command in-process."""
    return invoke


@pytest.fixture
def cli_json() -> Callable[..., Any]:
    """Like ``cli`` with ``--json``, asserting success and returning the parsed output."""
    return invoke_json
