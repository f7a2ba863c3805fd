"""The server token: where it comes from, how it is stored and how it is checked."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from torchops.config import Settings
from torchops.errors import InvalidInput, Unauthorized
from torchops.serving.auth import TokenAuth, load_token


def test_token_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    token, path = load_token(settings)
    assert path == settings.token_path
    assert path is not None and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 32
    again, same_path = load_token(settings)
    assert (again, same_path) == (token, path)


def test_environment_token_wins_and_writes_nothing(tmp_path: Path) -> None:
    settings = Settings.load({"TORCHOPS_TOKEN": "from-env", "TORCHOPS_HOME": str(tmp_path)})
    assert load_token(settings) == ("from-env", None)
    assert not (tmp_path / "token").exists()


def test_token_file_readable_by_others_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("shared-secret\n")
    path.chmod(0o644)
    token, _ = load_token(Settings(home=tmp_path))
    assert token == "shared-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_empty_token_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    (tmp_path / "token").chmod(0o600)
    with pytest.raises(InvalidInput, match="empty"):
        load_token(Settings(home=tmp_path))


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing"),
        ("Basic dXNlcjpwYXNz", "Bearer"),
        ("Bearer wrong", "invalid"),
        ("Bearer ", "invalid"),
        ("Bearer secret-tokenX", "invalid"),
        (b"Bearer secret-toke", "invalid"),
    ],
)
def test_check_refuses(header: str | bytes | None, fragment: str) -> None:
    with pytest.raises(Unauthorized, match=fragment):
        TokenAuth("secret-token").check(header)


@pytest.mark.parametrize("header", ["Bearer secret-token", b"bearer secret-token"])
def test_check_accepts(header: str | bytes) -> None:
    TokenAuth("secret-token").check(header)


def test_empty_token_is_refused_and_repr_hides_it() -> None:
    with pytest.raises(InvalidInput):
        TokenAuth("")
    assert "secret" not in repr(TokenAuth("secret-token"))
