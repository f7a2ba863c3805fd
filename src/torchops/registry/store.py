"""The metadata store: SQLAlchemy Core tables and engines for SQLite and PostgreSQL.

One schema serves both back ends. SQLite runs in WAL mode with a busy timeout and takes
its write lock up front (``BEGIN IMMEDIATE``) in write transactions; PostgreSQL writers
lock the rows they change (``SELECT ... FOR UPDATE``). Tables are created on first use and
a ``schema_version`` row in ``meta`` records the layout so later releases can migrate.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, Connection, make_url

from torchops.errors import Conflict, InvalidInput

__all__ = [
    "SCHEMA_VERSION",
    "UTCDateTime",
    "alias_events",
    "aliases",
    "artifacts",
    "connect",
    "ensure_schema",
    "meta",
    "metadata",
    "metrics",
    "model_tags",
    "models",
    "uploads",
    "utcnow",
    "version_tags",
    "versions",
]

#: bump with a migration when the tables below change
SCHEMA_VERSION = 1
#: how long a SQLite connection waits for another writer before giving up
BUSY_TIMEOUT_MS = 30_000
#: the execution option that marks a write transaction (``BEGIN IMMEDIATE`` on SQLite)
WRITE = "torchops_write"
#: the ``meta`` row writers lock to serialise blob leases against garbage collection
BLOB_LOCK = "blob_lock"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every back end (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise InvalidInput(f"datetime {value.isoformat()} has no timezone; use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Json = JSON().with_variant(JSONB(), "postgresql")
Name = String(128)

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", Name, nullable=False, unique=True),
    Column("description", Text),
    Column("created_at", UTCDateTime, nullable=False),
    # the highest version number ever given out: numbers are never reused after a delete
    Column("last_version", Integer, nullable=False, default=0),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("signature", Json, nullable=False),
    Column("source", String(64), nullable=False),
    Column("parent", Integer),
    Column("description", Text),
    Column("details", Json, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
)

artifacts = Table(
    "artifacts",
    metadata,
    Column("version_id", ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(32), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("details", Json, nullable=False),
    Index("ix_artifacts_sha256", "sha256"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("model_id", ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("alias", Name, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

alias_events = Table(
    "alias_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    Column("alias", Name, nullable=False),
    Column("from_version", Integer),
    Column("to_version", Integer),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(256), nullable=False),
    Column("reason", Text),
    Index("ix_alias_events_model_alias", "model_id", "alias", "at"),
)

model_tags = Table(
    "model_tags",
    metadata,
    Column("model_id", ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("value", Text, nullable=False),
)

version_tags = Table(
    "version_tags",
    metadata,
    Column("version_id", ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("value", Text, nullable=False),
)

metrics = Table(
    "metrics",
    metadata,
    Column("version_id", ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("value", Float, nullable=False),
)

# Blobs being written for a registration or export that has not committed yet: garbage
# collection keeps them. A lease older than the registry's lease timeout is stale (its
# writer died) and no longer protects anything.
uploads = Table(
    "uploads",
    metadata,
    Column("lease", String(32), primary_key=True),
    Column("sha256", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_uploads_sha256", "sha256"),
)


def connect(url: str | URL) -> Engine:
    """An engine for ``url``: ``sqlite:///path`` or ``postgresql+psycopg://...``.

    A bare ``postgresql://`` URL uses psycopg 3, the driver torchops ships with.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
        )
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        return create_engine(parsed, pool_pre_ping=True)
    raise InvalidInput(
        f"unsupported registry database {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    )


#: SQLite page size of a new registry database (the largest SQLite allows)
PAGE_SIZE = 65_536


def _use_wal(cursor: Any) -> None:
    """Put the database in WAL mode (persistent, so usually already done), retrying while
    another connection holds the lock the switch needs: SQLite answers "database is
    locked" at once here rather than waiting for the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return  # WAL now, or a database that cannot be (in memory)
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # let SQLAlchemy's "begin" event below decide how transactions start
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # the timeout first: switching a new database to WAL takes a lock that another
        # process opening it at the same moment may hold
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # a new database gets 64 KiB pages (an existing one keeps its own): monitoring
        # stores observations as blobs of a few MB, which SQLite writes with less than half
        # the CPU in large pages (``bench/observations.py``)
        cursor.execute(f"PRAGMA page_size={PAGE_SIZE}")
        _use_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def ensure_schema(engine: Engine) -> None:
    """Create the tables if missing and check the stored schema version."""
    with engine.execution_options(**{WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            # two processes creating the tables at once would collide on the catalogs
            conn.execute(text("SELECT pg_advisory_xact_lock(7260513)"))
        metadata.create_all(conn)
        stored = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version"))
        row = stored.first()
        if row is None:
            conn.execute(
                meta.insert(),
                [
                    {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                    {"key": BLOB_LOCK, "value": ""},
                ],
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise Conflict(
                f"the registry database has schema version {row[0]}, newer than this "
                f"torchops supports ({SCHEMA_VERSION}); upgrade torchops"
            )
