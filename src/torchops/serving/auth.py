"""Bearer-token authentication: the token's origin and a constant-time check."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from torchops.config import Settings
from torchops.errors import InvalidInput, Unauthorized

__all__ = ["TokenAuth", "load_token"]


def load_token(settings: Settings) -> tuple[str, Path | None]:
    """Return the server token and the file it lives in (None when it came from the environment).

    ``Settings.token`` (``TORCHOPS_TOKEN``) wins; otherwise the token is read from
    ``$TORCHOPS_HOME/token``, which is created on first use with mode 0600.
    """
    if settings.token:
        return settings.token, None
    path = settings.token_path
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path), path
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(token + "\n")
    return token, path


def _read_token(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        # a token others can read is no secret: tighten it rather than serve with it
        path.chmod(0o600)
    token = path.read_text(encoding="ascii").strip()
    if not token:
        raise InvalidInput(f"token file {path} is empty: delete it to generate a new token")
    return token


class TokenAuth:
    """Checks ``Authorization: Bearer <token>`` headers in constant time."""

    def __init__(self, token: str) -> None:
        if not token:
            raise InvalidInput("the server token must not be empty")
        self.token = token
        self._expected = token.encode()

    def check(self, header: bytes | str | None) -> None:
        """Raise ``Unauthorized`` unless ``header`` is ``Bearer <token>``."""
        if header is None:
            raise Unauthorized("missing 'Authorization: Bearer <token>' header")
        raw = header.encode("latin-1") if isinstance(header, str) else header
        scheme, _, given = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            raise Unauthorized("the Authorization header must use the Bearer scheme")
        if not hmac.compare_digest(given.strip(), self._expected):
            raise Unauthorized("invalid bearer token")

    def __repr__(self) -> str:
        return "TokenAuth(token='***')"
