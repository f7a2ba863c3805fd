"""The registry's metadata side: listing and resolving versions, aliases, history, tags."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, func, select
from sqlalchemy.exc import IntegrityError

from torchops.errors import InvalidInput, NotFound
from torchops.refs import DEFAULT_ALIAS, ModelRef, validate_name
from torchops.registry import _records as rec
from torchops.registry import store
from torchops.types import AliasEvent, ModelInfo, ModelVersion


class Catalog:
    """Reads and metadata edits over the store; ``Registry`` adds blobs on top."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{store.WRITE: True})

    @property
    def engine(self) -> Engine:
        """The metadata store's SQLAlchemy engine (monitoring keeps its tables there too)."""
        return self._engine

    # -- reading -----------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every registered model, by name."""
        with self._read() as conn:
            rows = list(conn.execute(select(store.models).order_by(store.models.c.name)))
            return self._model_infos(conn, rows)

    def get_model(self, name: str) -> ModelInfo:
        with self._read() as conn:
            return self._model_infos(conn, [self._model_row(conn, name)])[0]

    def versions(self, name: str) -> list[ModelVersion]:
        """The model's ready versions, oldest first."""
        with self._read() as conn:
            model = self._model_row(conn, name)
            rows = conn.execute(
                select(store.versions)
                .where(store.versions.c.model_id == model.id)
                .order_by(store.versions.c.version)
            ).all()
            return rec.load_versions(conn, model, rows)

    def get(self, ref: str | ModelRef) -> ModelVersion:
        """Resolve ``name`` (alias ``production``, else the latest version), ``name:3`` or
        ``name@alias``."""
        with self._read() as conn:
            return self._fetch(conn, ref)

    def aliases(self, name: str | None = None) -> dict[tuple[str, str], int]:
        """``(model, alias) -> version`` for one model or all; one cheap query."""
        query = select(store.models.c.name, store.aliases.c.alias, store.aliases.c.version).join(
            store.models, store.models.c.id == store.aliases.c.model_id
        )
        with self._read() as conn:
            if name is not None:
                self._model_row(conn, name)
                query = query.where(store.models.c.name == name)
            rows = conn.execute(query.order_by(store.models.c.name, store.aliases.c.alias))
            return {(model, alias): version for model, alias, version in rows}

    def history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every move of the model's aliases (or of one alias), oldest first."""
        events = store.alias_events
        with self._read() as conn:
            model = self._model_row(conn, name)
            query = select(events).where(events.c.model_id == model.id)
            if alias is not None:
                query = query.where(events.c.alias == validate_name(alias, "alias"))
            rows = conn.execute(query.order_by(events.c.id)).all()
        return [
            AliasEvent(
                name=model.name,
                alias=row.alias,
                from_version=row.from_version,
                to_version=row.to_version,
                at=row.at,
                actor=row.actor,
                reason=row.reason,
            )
            for row in rows
        ]

    def alias_at(self, name: str, alias: str, at: datetime) -> int | None:
        """The version ``alias`` pointed to at time ``at`` (None: it did not exist then)."""
        validate_name(alias, "alias")
        if not isinstance(at, datetime) or at.tzinfo is None:
            raise InvalidInput(f"alias_at needs a timezone-aware datetime, got {at!r}")
        events = store.alias_events
        with self._read() as conn:
            model = self._model_row(conn, name)
            version: int | None = conn.execute(
                select(events.c.to_version)
                .where(events.c.model_id == model.id, events.c.alias == alias, events.c.at <= at)
                .order_by(events.c.at.desc(), events.c.id.desc())
                .limit(1)
            ).scalar()
        return version

    # -- aliases -----------------------------------------------------------------------

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        actor: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Point ``alias`` at ``version`` and record the move (a no-op move records nothing)."""
        validate_name(alias, "alias")
        rec.check_version_number(version)
        rec.check_text(reason, "reason")
        actor = rec.default_actor(actor)
        with self._write() as conn:
            model = self._lock_model(conn, name)
            self._version_row(conn, model, version)
            current = self._alias_target(conn, model, alias)
            if current != version:
                self._move_alias(conn, model, alias, current, version, actor, reason)

    def remove_alias(
        self, name: str, alias: str, *, actor: str | None = None, reason: str | None = None
    ) -> None:
        validate_name(alias, "alias")
        rec.check_text(reason, "reason")
        actor = rec.default_actor(actor)
        with self._write() as conn:
            model = self._lock_model(conn, name)
            current = self._alias_target(conn, model, alias)
            if current is None:
                raise NotFound(f"model {model.name!r} has no alias {alias!r}")
            self._move_alias(conn, model, alias, current, None, actor, reason)

    def _alias_target(self, conn: Connection, model: Row[Any], alias: str) -> int | None:
        found: int | None = conn.execute(
            select(store.aliases.c.version).where(
                store.aliases.c.model_id == model.id, store.aliases.c.alias == alias
            )
        ).scalar()
        return found

    def _move_alias(
        self,
        conn: Connection,
        model: Row[Any],
        alias: str,
        from_version: int | None,
        to_version: int | None,
        actor: str,
        reason: str | None,
    ) -> None:
        now = store.utcnow()
        table = store.aliases
        where = (table.c.model_id == model.id, table.c.alias == alias)
        if to_version is None:
            conn.execute(table.delete().where(*where))
        elif from_version is None:
            conn.execute(
                table.insert().values(
                    model_id=model.id, alias=alias, version=to_version, updated_at=now
                )
            )
        else:
            conn.execute(table.update().where(*where).values(version=to_version, updated_at=now))
        conn.execute(
            store.alias_events.insert().values(
                model_id=model.id,
                alias=alias,
                from_version=from_version,
                to_version=to_version,
                at=now,
                actor=actor,
                reason=reason,
            )
        )

    # -- descriptions, tags, metrics ---------------------------------------------------

    def set_model_description(self, name: str, description: str | None) -> None:
        rec.check_text(description, "description")
        with self._write() as conn:
            model = self._lock_model(conn, name)
            conn.execute(
                store.models.update()
                .where(store.models.c.id == model.id)
                .values(description=description)
            )

    def set_version_description(self, ref: str | ModelRef, description: str | None) -> None:
        rec.check_text(description, "description")
        with self._write() as conn:
            row = self._locked_version(conn, ref)
            conn.execute(
                store.versions.update()
                .where(store.versions.c.id == row.id)
                .values(description=description)
            )

    def set_model_tags(self, name: str, tags: Mapping[str, str | None]) -> None:
        """Merge ``tags`` into the model's; a None value deletes that tag."""
        checked = rec.check_tags(tags, deletes=True)
        with self._write() as conn:
            model = self._lock_model(conn, name)
            self._merge_rows(conn, store.model_tags, "model_id", model.id, checked)

    def set_version_tags(self, ref: str | ModelRef, tags: Mapping[str, str | None]) -> None:
        """Merge ``tags`` into the version's; a None value deletes that tag."""
        checked = rec.check_tags(tags, deletes=True)
        with self._write() as conn:
            row = self._locked_version(conn, ref)
            self._merge_rows(conn, store.version_tags, "version_id", row.id, checked)

    def set_metrics(self, ref: str | ModelRef, metrics: Mapping[str, float | None]) -> None:
        """Merge ``metrics`` into the version's; a None value deletes that metric."""
        checked = rec.check_metrics(metrics, deletes=True)
        with self._write() as conn:
            row = self._locked_version(conn, ref)
            self._merge_rows(conn, store.metrics, "version_id", row.id, checked)

    def _merge_rows(
        self,
        conn: Connection,
        table: Table,
        owner: str,
        owner_id: int,
        values: Mapping[str, Any],
    ) -> None:
        if not values:
            return
        column = table.c[owner]
        conn.execute(table.delete().where(column == owner_id, table.c.key.in_(list(values))))
        rows = [{owner: owner_id, "key": k, "value": v} for k, v in values.items() if v is not None]
        if rows:
            conn.execute(table.insert(), rows)

    # -- shared helpers ----------------------------------------------------------------

    def _read(self) -> AbstractContextManager[Connection]:
        return self._engine.begin()

    def _write(self) -> AbstractContextManager[Connection]:
        return self._writer.begin()

    def _model_row(self, conn: Connection, name: str) -> Row[Any]:
        validate_name(name)
        row = conn.execute(select(store.models).where(store.models.c.name == name)).first()
        if row is None:
            raise NotFound(f"no model named {name!r}")
        return row

    def _lock_model(self, conn: Connection, name: str, *, create: bool = False) -> Row[Any]:
        """The model's row, locked until the transaction ends (created first if ``create``)."""
        validate_name(name)
        query = select(store.models).where(store.models.c.name == name).with_for_update()
        row = conn.execute(query).first()
        if row is None and create:
            try:
                with conn.begin_nested():
                    conn.execute(
                        store.models.insert().values(
                            name=name, created_at=store.utcnow(), last_version=0
                        )
                    )
            except IntegrityError:
                pass  # a concurrent writer created it: lock theirs below
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"no model named {name!r}")
        return row

    def _locked_version(self, conn: Connection, ref: str | ModelRef) -> Row[Any]:
        parsed = ModelRef.parse(ref)
        model = self._lock_model(conn, parsed.name)
        return self._version_row(conn, model, self._resolve_number(conn, model, parsed))

    def _version_row(
        self, conn: Connection, model: Row[Any], number: int, *, what: str = "version"
    ) -> Row[Any]:
        row = conn.execute(
            select(store.versions).where(
                store.versions.c.model_id == model.id, store.versions.c.version == number
            )
        ).first()
        if row is None:
            raise NotFound(f"model {model.name!r} has no {what} {number}")
        return row

    def _resolve_number(self, conn: Connection, model: Row[Any], ref: ModelRef) -> int:
        """The version number ``ref`` names (for ``name:N`` it may not exist)."""
        if ref.version is not None:
            return ref.version
        number = self._alias_target(conn, model, ref.alias or DEFAULT_ALIAS)
        if number is not None:
            return number
        if ref.alias is not None:
            raise NotFound(f"model {model.name!r} has no alias {ref.alias!r}")
        latest: int | None = conn.execute(
            select(func.max(store.versions.c.version)).where(store.versions.c.model_id == model.id)
        ).scalar()
        if latest is None:
            raise NotFound(f"model {model.name!r} has no versions")
        return latest

    def _fetch(self, conn: Connection, ref: str | ModelRef) -> ModelVersion:
        parsed = ModelRef.parse(ref)
        model = self._model_row(conn, parsed.name)
        row = self._version_row(conn, model, self._resolve_number(conn, model, parsed))
        return rec.load_versions(conn, model, [row])[0]

    def _model_infos(self, conn: Connection, rows: list[Row[Any]]) -> list[ModelInfo]:
        if not rows:
            return []
        ids = [row.id for row in rows]
        v = store.versions.c
        counts = {
            model_id: (latest, count)
            for model_id, latest, count in conn.execute(
                select(v.model_id, func.max(v.version), func.count())
                .where(v.model_id.in_(ids))
                .group_by(v.model_id)
            )
        }
        pointed: dict[int, dict[str, int]] = defaultdict(dict)
        a = store.aliases.c
        query = select(a.model_id, a.alias, a.version).where(a.model_id.in_(ids))
        for model_id, alias, version in conn.execute(query.order_by(a.alias)):
            pointed[model_id][alias] = version
        tags: dict[int, dict[str, str]] = defaultdict(dict)
        t = store.model_tags.c
        query = select(t.model_id, t.key, t.value).where(t.model_id.in_(ids))
        for model_id, key, value in conn.execute(query.order_by(t.key)):
            tags[model_id][key] = value
        return [
            ModelInfo(
                name=row.name,
                created_at=row.created_at,
                description=row.description,
                tags=tags[row.id],
                aliases=pointed[row.id],
                latest_version=counts.get(row.id, (None, 0))[0],
                version_count=counts.get(row.id, (None, 0))[1],
            )
            for row in rows
        ]
