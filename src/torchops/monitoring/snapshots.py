"""Stored snapshots of quality and drift, so a model's history survives restarts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import Engine, select

from torchops.errors import InvalidInput
from torchops.monitoring import store
from torchops.refs import validate_name
from torchops.registry.store import utcnow

__all__ = ["Snapshot", "SnapshotKind", "SnapshotStore"]

SnapshotKind = Literal["quality", "drift"]
_KINDS: tuple[str, ...] = get_args(SnapshotKind)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Quality metrics or a drift report of one version over one window, at one time."""

    id: int
    model: str
    version: int
    at: datetime
    kind: str
    window: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "at": self.at.isoformat(),
            "kind": self.kind,
            "window": self.window,
            "values": dict(self.values),
        }


class SnapshotStore:
    """Writes and reads snapshots in the metadata store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        store.ensure_tables(engine)

    def write(
        self,
        model: str,
        version: int,
        kind: str,
        window: str,
        values: Mapping[str, Any],
        *,
        at: datetime | None = None,
    ) -> None:
        """Store one snapshot; non-finite numbers are stored as null (JSON has no NaN).

        ``window`` names what the values cover, e.g. ``"cumulative"``, ``"last_1000"`` or
        ``"last_300s"``.
        """
        validate_name(model)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidInput(f"version must be a positive integer, got {version!r}")
        if kind not in _KINDS:
            raise InvalidInput(f"snapshot kind must be one of {list(_KINDS)}, got {kind!r}")
        if not isinstance(window, str) or not 0 < len(window) <= 64:
            raise InvalidInput(f"snapshot window must be a short non-empty name, got {window!r}")
        if not isinstance(values, Mapping):
            raise InvalidInput(f"snapshot values must be a mapping, got {type(values).__name__}")
        try:
            data = store.jsonable(values)
        except TypeError as exc:
            raise InvalidInput(f"snapshot values must be JSON data: {exc}") from None
        row = {
            "model": model,
            "version": version,
            "at": at if at is not None else utcnow(),
            "kind": kind,
            "window": window,
            "values": data,
        }
        with store.writer(self.engine).begin() as conn:
            conn.execute(store.snapshots.insert(), [row])

    def history(
        self,
        model: str,
        version: int | None = None,
        kind: str | None = None,
        limit: int | None = None,
        *,
        window: str | None = None,
    ) -> list[Snapshot]:
        """The newest ``limit`` snapshots (all when None), oldest first."""
        validate_name(model)
        if kind is not None and kind not in _KINDS:
            raise InvalidInput(f"snapshot kind must be one of {list(_KINDS)}, got {kind!r}")
        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
        s = store.snapshots
        query = select(s).where(s.c.model == model)
        if version is not None:
            query = query.where(s.c.version == version)
        if kind is not None:
            query = query.where(s.c.kind == kind)
        if window is not None:
            query = query.where(s.c.window == window)
        query = query.order_by(s.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            Snapshot(
                id=row.id,
                model=row.model,
                version=row.version,
                at=row.at,
                kind=row.kind,
                window=row.window,
                values=dict(row._mapping["values"]),
            )
            for row in reversed(rows)
        ]
