from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from torchops.errors import Conflict, InvalidInput
from torchops.registry import store


def test_tables_and_schema_version_are_created(database_url: str) -> None:
    engine = store.connect(database_url)
    try:
        store.ensure_schema(engine)
        store.ensure_schema(engine)  # idempotent
        names = set(inspect(engine).get_table_names())
        assert set(store.metadata.tables) <= names
        with engine.connect() as conn:
            rows = dict(conn.execute(select(store.meta.c.key, store.meta.c.value)).all())
        assert rows["schema_version"] == str(store.SCHEMA_VERSION)
    finally:
        engine.dispose()


def test_a_newer_schema_is_refused(database_url: str) -> None:
    engine = store.connect(database_url)
    try:
        store.ensure_schema(engine)
        with engine.begin() as conn:
            conn.execute(
                store.meta.update()
                .where(store.meta.c.key == "schema_version")
                .values(value=str(store.SCHEMA_VERSION + 1))
            )
        with pytest.raises(Conflict, match="newer"):
            store.ensure_schema(engine)
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    engine = store.connect(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == store.BUSY_TIMEOUT_MS
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_sqlite_write_transactions_take_the_lock_up_front(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    engine = store.connect(f"sqlite:///{path}")
    store.ensure_schema(engine)
    writer = engine.execution_options(**{store.WRITE: True})
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        # BEGIN IMMEDIATE holds the write lock before any statement ran
        with writer.begin(), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        with engine.begin():
            # a read transaction does not
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        engine.dispose()
        other.close()


def test_datetimes_come_back_aware_in_utc(database_url: str) -> None:
    engine = store.connect(database_url)
    try:
        store.ensure_schema(engine)
        at = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
        with engine.begin() as conn:
            conn.execute(store.models.insert().values(name="m", created_at=at, last_version=0))
            back = conn.execute(select(store.models.c.created_at)).scalar_one()
        assert back == at
        assert back.tzinfo is not None
        assert back.utcoffset() == timedelta(0)
        assert back.hour == 10
        with pytest.raises(Exception, match="timezone"), engine.begin() as conn:
            conn.execute(
                store.models.insert().values(
                    name="n", created_at=datetime(2024, 1, 1), last_version=0
                )
            )
    finally:
        engine.dispose()


def test_plain_postgresql_urls_use_psycopg() -> None:
    engine = store.connect("postgresql://u@127.0.0.1:1/db")
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_unsupported_databases_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unsupported registry database"):
        store.connect("mysql://u:secret@host/db")


def test_utcnow_is_aware() -> None:
    assert store.utcnow().tzinfo is UTC
