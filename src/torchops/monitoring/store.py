"""Monitoring tables: observations, feedback, snapshots and alerts, in the registry's database.

They live on their own ``MetaData`` beside the registry's tables, on the same engine
(``Registry.engine``), and are created on first use by ``ensure_tables``: idempotent, and
safe when two processes start at once (SQLite serialises on ``BEGIN IMMEDIATE``; PostgreSQL
takes a transaction-scoped advisory lock).

Feedback has its own table and is joined to observations by ``(model, request_id)`` on
read, so a label that arrives before its observation is written joins once it is.
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from torchops.errors import Conflict, InvalidInput
from torchops.registry import store as registry_store
from torchops.registry.store import Json, UTCDateTime
from torchops.types import Array

__all__ = [
    "RAW_INSERT_COLUMNS",
    "SCHEMA_VERSION",
    "ArrayEncoder",
    "alert_events",
    "alert_rules",
    "ensure_tables",
    "execute_many_ignoring_duplicates",
    "feedback",
    "insert_ignoring_duplicates",
    "json_text",
    "jsonable",
    "metadata",
    "observations",
    "raw_insert_ignoring_duplicates",
    "snapshots",
    "writer",
]

#: layout of the monitoring tables, recorded in the registry's ``meta`` table
SCHEMA_VERSION = 1
_SCHEMA_KEY = "monitoring_schema_version"
#: distinct from the registry's own advisory lock key
_ADVISORY_LOCK = 7260514

# 64-bit ids on PostgreSQL; SQLite autoincrements only an INTEGER PRIMARY KEY (its rowid)
Id = BigInteger().with_variant(Integer(), "sqlite")
Name = String(128)
RequestId = String(256)

metadata = MetaData()

observations = Table(
    "observations",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("model", Name, nullable=False),
    Column("version", Integer, nullable=False),
    Column("request_id", RequestId, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("latency_s", Float, nullable=False),
    Column("outputs", LargeBinary, nullable=False),
    Column("inputs", LargeBinary),
    Column("prediction", Json),
    Column("proba", Json),
    UniqueConstraint("model", "request_id", name="uq_observations_model_request"),
    Index("ix_observations_model_version_id", "model", "version", "id"),
    Index("ix_observations_at", "at"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("model", Name, nullable=False),
    Column("request_id", RequestId, nullable=False),
    Column("target", Json, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("source", String(64), nullable=False),
    UniqueConstraint("model", "request_id", name="uq_feedback_model_request"),
    Index("ix_feedback_model_id", "model", "id"),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("model", Name, nullable=False),
    Column("version", Integer, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("window", String(64), nullable=False),
    Column("values", Json, nullable=False),
    Index("ix_snapshots_model_version_kind_id", "model", "version", "kind", "id"),
)

alert_rules = Table(
    "alert_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", Name, nullable=False),
    Column("name", Name, nullable=False),
    Column("metric", String(256), nullable=False),
    Column("op", String(2), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("window", Integer),
    Column("min_samples", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("model", "name", name="uq_alert_rules_model_name"),
)

alert_events = Table(
    "alert_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("rule_id", ForeignKey("alert_rules.id", ondelete="CASCADE"), nullable=False),
    Column("model", Name, nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("value", Float),
    Column("at", UTCDateTime, nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_alert_events_model_id", "model", "id"),
    Index("ix_alert_events_rule_version_id", "rule_id", "version", "id"),
)

#: numpy ``dtype.str`` (little-endian) -> safetensors dtype, for ``ArrayEncoder``
_SAFETENSORS_DTYPES = {
    "<f2": "F16",
    "<f4": "F32",
    "<f8": "F64",
    "|i1": "I8",
    "<i2": "I16",
    "<i4": "I32",
    "<i8": "I64",
    "|u1": "U8",
    "<u2": "U16",
    "<u4": "U32",
    "<u8": "U64",
    "|b1": "BOOL",
}

_ready: weakref.WeakSet[Engine] = weakref.WeakSet()
_ready_lock = threading.Lock()


def writer(engine: Engine) -> Engine:
    """``engine`` marked for write transactions (``BEGIN IMMEDIATE`` on SQLite)."""
    return engine.execution_options(**{registry_store.WRITE: True})


def ensure_tables(engine: Engine) -> None:
    """Create the monitoring tables if missing; cheap after the first call per engine."""
    with _ready_lock:
        if engine in _ready:
            return
        with writer(engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                # concurrent CREATE TABLEs would collide on the system catalogs
                conn.execute(text(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})"))
            # the registry's tables (and its ``meta``) exist when given a registry's engine;
            # create them otherwise so the schema row below has somewhere to go
            registry_store.metadata.create_all(conn, tables=[registry_store.meta])
            metadata.create_all(conn)
            meta = registry_store.meta
            stored = conn.execute(select(meta.c.value).where(meta.c.key == _SCHEMA_KEY)).first()
            if stored is None:
                conn.execute(meta.insert().values(key=_SCHEMA_KEY, value=str(SCHEMA_VERSION)))
            elif int(stored[0]) > SCHEMA_VERSION:
                raise Conflict(
                    f"the monitoring tables have schema version {stored[0]}, newer than this "
                    f"torchops supports ({SCHEMA_VERSION}); upgrade torchops"
                )
        _ready.add(engine)


class ArrayEncoder:
    """Named arrays as safetensors bytes, fast for the few layouts a model's traffic has.

    The JSON header of each layout (names, dtypes, shapes) is built once and cached, so
    encoding an observation is a concatenation of its arrays' bytes; ``decode_arrays``
    (the safetensors library) reads the result. Other dtypes and byte orders go through
    ``torchops.packaging.encode_arrays``. Not thread-safe: one per writer thread.
    """

    def __init__(self, cache_size: int = 1024) -> None:
        self.cache_size = cache_size
        self._headers: dict[tuple[tuple[str, Any, tuple[int, ...]], ...], bytes] = {}

    def encode(self, arrays: Mapping[str, Array]) -> bytes:
        try:
            # keyed on the dtype object (``dtype.str`` is computed on each access); equal
            # numpy dtypes have the same ``str``; a list, not a generator: this is per row
            layout = tuple([(name, a.dtype, a.shape) for name, a in arrays.items()])
        except AttributeError:  # not numpy arrays
            return _encode_arrays(arrays)
        header = self._headers.get(layout)
        if header is None:
            header = _safetensors_header(layout)
            if header is None:
                return _encode_arrays(arrays)
            if len(self._headers) >= self.cache_size:
                self._headers.clear()
            self._headers[layout] = header
        # tobytes() is C order whatever the array's memory layout
        return header + b"".join([a.tobytes() for a in arrays.values()])


def _encode_arrays(arrays: Mapping[str, Array]) -> bytes:
    # imported here: torchops.packaging loads torch, which readers of alerts do not need
    from torchops.packaging import encode_arrays

    return encode_arrays(arrays)


def _safetensors_header(layout: tuple[tuple[str, Any, tuple[int, ...]], ...]) -> bytes | None:
    """The length-prefixed safetensors header for arrays laid out one after another."""
    entries: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in layout:
        if not isinstance(dtype, np.dtype):  # e.g. a torch tensor
            return None
        code = _SAFETENSORS_DTYPES.get(dtype.str)
        if code is None or not isinstance(name, str) or not name or name in entries:
            return None
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = orjson.dumps(entries)
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def insert_ignoring_duplicates(dialect: str, table: Table) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` for ``table`` on SQLite or PostgreSQL."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


#: the observation columns ``raw_insert_ignoring_duplicates`` binds, in order
RAW_INSERT_COLUMNS = (
    "model",
    "version",
    "request_id",
    "at",
    "latency_s",
    "outputs",
    "inputs",
    "prediction",
    "proba",
)
_JSON_COLUMNS = frozenset({"prediction", "proba"})


def raw_insert_ignoring_duplicates(dialect: str) -> str:
    """DBAPI SQL inserting one observation (``RAW_INSERT_COLUMNS``), skipping duplicates.

    For ``executemany`` on the raw connection: positional parameters in the driver's
    style (sqlite3 ``?``, psycopg ``%s``); JSON columns take JSON text (cast to JSONB on
    PostgreSQL; SQLite stores the text, as SQLAlchemy's JSON type does).
    """
    if dialect == "postgresql":
        marks = ["%s::jsonb" if c in _JSON_COLUMNS else "%s" for c in RAW_INSERT_COLUMNS]
    elif dialect == "sqlite":
        marks = ["?"] * len(RAW_INSERT_COLUMNS)
    else:
        raise InvalidInput(f"observations need SQLite or PostgreSQL, not {dialect!r}")
    return (
        f"INSERT INTO {observations.name} ({', '.join(RAW_INSERT_COLUMNS)}) "
        f"VALUES ({', '.join(marks)}) ON CONFLICT DO NOTHING"
    )


def execute_many_ignoring_duplicates(
    engine: Engine, sql: str, rows: list[tuple[Any, ...]]
) -> list[bool] | None:
    """Run ``sql`` (``raw_insert_ignoring_duplicates``) for ``rows`` in one transaction.

    None when every row was inserted, else which ones were (rare: a duplicate makes the
    batch roll back and go again one row at a time, to learn which rows lost).
    """
    sqlite = engine.dialect.name == "sqlite"
    conn = engine.raw_connection()
    try:
        cursor = conn.cursor()
        try:
            if sqlite:  # the write lock up front, as ``writer`` takes it
                cursor.execute("BEGIN IMMEDIATE")
            cursor.executemany(sql, rows)
            if cursor.rowcount == len(rows):  # summed over the rows by sqlite3 and psycopg
                conn.commit()
                return None
            conn.rollback()
            if sqlite:
                cursor.execute("BEGIN IMMEDIATE")
            inserted: list[bool] = []
            for row in rows:
                cursor.execute(sql, row)
                inserted.append(cursor.rowcount == 1)
            conn.commit()
            return inserted
        except BaseException:
            conn.rollback()
            raise
        finally:
            cursor.close()
    finally:
        conn.close()


def json_text(value: Any) -> str:
    """``value`` as JSON text, as SQLAlchemy's JSON type stores it (None → ``null``)."""
    if value is None:
        return "null"
    try:
        # plain Python values (what ``RowRule.predict`` gives); orjson writes NaN and ±inf
        # as null, as ``jsonable`` does
        return orjson.dumps(value).decode()
    except TypeError:  # numpy values, non-string keys, integers beyond 64 bits
        return json.dumps(jsonable(value), allow_nan=False)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: numpy scalars and arrays unwrapped, NaN and ±inf → None.

    PostgreSQL's JSONB rejects NaN, and JSON has no spelling for it.
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return jsonable(tolist())
    raise TypeError(f"{type(value).__name__} is not JSON data")
