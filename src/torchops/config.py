"""One typed settings object: constructor arguments > ``TORCHOPS_*`` environment > defaults.

Read once, at start-up (``Settings.load()``); nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from torchops.errors import InvalidInput

__all__ = ["Settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Where torchops keeps its state and how it serves.

    ``home`` holds the default SQLite database, artifacts, token and TensorBoard logs.
    ``registry_url`` (a SQLAlchemy URL) and ``artifact_url`` (a folder or fsspec URL)
    override the defaults under ``home``.
    """

    home: Path = field(default_factory=lambda: Path("~/.torchops").expanduser())
    registry_url: str | None = None
    artifact_url: str | None = None
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_delay_ms: float = 0.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    max_body_bytes: int = 64 * 1024 * 1024
    poll_interval_s: float = 1.0

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``overrides`` (None values ignored), then ``env``, then defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"TORCHOPS_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, raw, cls.__dataclass_fields__[f.name].type)
        for key, value in overrides.items():
            if key not in cls.__dataclass_fields__:
                raise TypeError(f"unknown setting {key!r}")
            if value is not None:
                values[key] = value
        if "home" in values:
            values["home"] = Path(values["home"]).expanduser()
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the metadata store."""
        return self.registry_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def artifacts_location(self) -> str:
        return self.artifact_url or str(self.home / "artifacts")

    @property
    def token_path(self) -> Path:
        return self.home / "token"

    @property
    def tensorboard_dir(self) -> Path:
        return self.home / "tensorboard"


def _convert(name: str, raw: str, annotation: object) -> Any:
    text = str(annotation)
    try:
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
    except ValueError:
        raise InvalidInput(f"TORCHOPS_{name.upper()}={raw!r} is not a number") from None
    if text == "Path":
        return Path(raw).expanduser()
    return raw
