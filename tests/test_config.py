from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from torchops.config import Settings
from torchops.errors import InvalidInput


def test_precedence_arguments_over_environment_over_defaults(tmp_path: Path) -> None:
    env = {"TORCHOPS_HOME": str(tmp_path / "env"), "TORCHOPS_MAX_BATCH_SIZE": "8"}
    from_env = Settings.load(env)
    assert from_env.home == tmp_path / "env"
    assert from_env.max_batch_size == 8
    assert from_env.port == Settings().port

    overridden = Settings.load(env, home=tmp_path / "arg", max_batch_size=None, port=9001)
    assert overridden.home == tmp_path / "arg"
    assert overridden.max_batch_size == 8  # None means "not given"
    assert overridden.port == 9001


def test_default_urls_live_under_home(tmp_path: Path) -> None:
    settings = Settings.load({}, home=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'registry.db'}"
    assert settings.artifacts_location == str(tmp_path / "artifacts")
    assert settings.token_path == tmp_path / "token"
    custom = Settings.load({"TORCHOPS_REGISTRY_URL": "postgresql+psycopg://h/db"}, home=tmp_path)
    assert custom.database_url == "postgresql+psycopg://h/db"


def test_bad_numbers_and_unknown_settings_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="TORCHOPS_PORT"):
        Settings.load({"TORCHOPS_PORT": "eighty"})
    with pytest.raises(TypeError):
        Settings.load({}, colour="blue")


def test_importing_torchops_does_no_work() -> None:
    code = (
        "import sys, os; os.environ.pop('TORCHOPS_HOME', None); import torchops; "
        "heavy = [m for m in ('torch', 'sqlalchemy', 'onnx', 'numpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
