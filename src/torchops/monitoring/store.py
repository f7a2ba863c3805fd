"""Monitoring tables: observations, feedback, snapshots and alerts, in the registry's database.

They live on their own ``MetaData`` beside the registry's tables, on the same engine
(``Registry.engine``), and are created on first use by ``ensure_tables``: idempotent, and
safe when two processes start at once (SQLite serialises on ``BEGIN IMMEDIATE``; PostgreSQL
takes a transaction-scoped advisory lock).

Observations are stored as batches, one row per batch of predictions a writer flushed
(``observation_batches``: per-row columns as arrays, see ``torchops.monitoring._batches``);
``observation_ids`` indexes the request ids clients chose, while server-generated ids
(``<prefix>-<n>``) are found through each batch's ``id_prefix``/``id_lo``/``id_hi`` range.
Feedback has its own table and is joined to observations by ``(model, request_id)`` on
read, so a label that arrives before its observation is written joins once it is.
Schema version 2 replaced version 1's row-per-observation ``observations`` table, which
is left in place but no longer read. Version 3 lets a batch's array bytes live in a
segment file beside a SQLite database (``segment``, ``segment_offset``, ``outputs_size``,
``inputs_size``; ``observation_segments`` lists the files, see
``torchops.monitoring._segments``); upgrading adds those columns to an existing table.
"""

from __future__ import annotations

import contextlib
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
    Boolean,
    Column,
    Connection,
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
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from torchops.errors import Conflict
from torchops.registry import store as registry_store
from torchops.registry.store import Json, UTCDateTime
from torchops.types import Array, Signature

__all__ = [
    "ID_SPAN",
    "SCHEMA_VERSION",
    "ArrayEncoder",
    "Piece",
    "Signatures",
    "alert_events",
    "alert_rules",
    "ensure_tables",
    "feedback",
    "insert_ignoring_duplicates",
    "json_text",
    "jsonable",
    "metadata",
    "observation_batches",
    "observation_ids",
    "observation_segments",
    "snapshots",
    "writer",
]

#: a stored batch's generated request numbers span less than this (``id_hi - id_lo``), so
#: a lookup reads only the batches whose ``id_lo`` is at most this far below the number
ID_SPAN = 200_000

#: layout of the monitoring tables, recorded in the registry's ``meta`` table
SCHEMA_VERSION = 3
_SCHEMA_KEY = "monitoring_schema_version"
#: distinct from the registry's own advisory lock key
_ADVISORY_LOCK = 7260514

# 64-bit ids on PostgreSQL; SQLite autoincrements only an INTEGER PRIMARY KEY (its rowid)
Id = BigInteger().with_variant(Integer(), "sqlite")
Name = String(128)
RequestId = String(256)

metadata = MetaData()

observation_batches = Table(
    "observation_batches",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("model", Name, nullable=False),
    Column("version", Integer, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("first_at", UTCDateTime, nullable=False),
    Column("last_at", UTCDateTime, nullable=False),
    # server-generated request ids are "<id_prefix>-<n>": the batch holds n in id_lo..id_hi,
    # a range narrower than ID_SPAN (wider ones index their ids in observation_ids)
    Column("id_prefix", String(64)),
    Column("id_lo", BigInteger),
    Column("id_hi", BigInteger),
    Column("ids", LargeBinary, nullable=False),
    Column("custom_ids", Text),
    Column("columns", LargeBinary, nullable=False),
    Column("predictions", Text),
    Column("probas", Text),
    Column("outputs", LargeBinary, nullable=False),
    Column("inputs", LargeBinary),
    # schema 3: on a file-backed SQLite store, outputs and inputs are empty here and their
    # bytes are in this segment file (torchops.monitoring._segments) at this offset
    Column("segment", String(64)),
    Column("segment_offset", BigInteger),
    Column("outputs_size", BigInteger),
    Column("inputs_size", BigInteger),
    Index("ix_observation_batches_model_version_id", "model", "version", "id"),
    Index("ix_observation_batches_model_prefix_lo", "model", "id_prefix", "id_lo"),
    Index("ix_observation_batches_last_at", "last_at"),
    Index("ix_observation_batches_segment", "segment"),
)

#: the columns schema 3 added to ``observation_batches``, added to older tables on upgrade
_ADDED_IN_3 = ("segment", "segment_offset", "outputs_size", "inputs_size")

observation_segments = Table(
    "observation_segments",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    # set once the file is synced and its writer has let go of it: nothing is appended
    Column("sealed", Boolean, nullable=False),
)

observation_ids = Table(
    "observation_ids",
    metadata,
    Column("model", Name, primary_key=True),
    Column("request_id", RequestId, primary_key=True),
    Column("batch_id", Id, nullable=False),
    Column("row", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_observation_ids_batch", "batch_id"),
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
            elif int(stored[0]) < SCHEMA_VERSION:  # the new tables were just created
                _add_columns(conn)
                conn.execute(
                    meta.update().where(meta.c.key == _SCHEMA_KEY).values(value=str(SCHEMA_VERSION))
                )
        _ready.add(engine)


def _add_columns(conn: Connection) -> None:
    """Add the columns (and index) of schema 3 to an older ``observation_batches``."""
    table = observation_batches
    present = {c["name"] for c in inspect(conn).get_columns(table.name)}
    for name in _ADDED_IN_3:
        if name not in present:
            kind = table.c[name].type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))
    for index in table.indexes:
        index.create(conn, checkfirst=True)


#: a piece of bytes to write (``ArrayEncoder.pieces``): bytes or a view of an array's
Piece = bytes | memoryview


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
        header = self._header(arrays)
        if header is None:
            return _encode_arrays(arrays)
        # tobytes() is C order whatever the array's memory layout
        return header + b"".join([a.tobytes() for a in arrays.values()])

    def pieces(self, arrays: Mapping[str, Array]) -> list[Piece]:
        """``encode(arrays)`` as buffers to be written one after another: the header, then
        each array's bytes (a view of a C-contiguous array, not a copy)."""
        header = self._header(arrays)
        if header is None:
            return [_encode_arrays(arrays)]
        return [header, *[_raw(a) for a in arrays.values()]]

    def _header(self, arrays: Mapping[str, Array]) -> bytes | None:
        """The cached safetensors header of ``arrays``; None when safetensors cannot hold
        them (not numpy arrays, other dtypes or byte orders)."""
        try:
            # keyed on the dtype object (``dtype.str`` is computed on each access); equal
            # numpy dtypes have the same ``str``; a list, not a generator: this is per row
            layout = tuple([(name, a.dtype, a.shape) for name, a in arrays.items()])
        except AttributeError:  # not numpy arrays
            return None
        header = self._headers.get(layout)
        if header is None:
            header = _safetensors_header(layout)
            if header is None:
                return None
            if len(self._headers) >= self.cache_size:
                self._headers.clear()
            self._headers[layout] = header
        return header


def _raw(a: Array) -> Piece:
    """The bytes of ``a`` in C order: a view when it is C-contiguous."""
    if a.flags.c_contiguous:
        with contextlib.suppress(ValueError, TypeError, NotImplementedError):
            return memoryview(a.data).cast("B")  # formats memoryview cannot cast: copied
    return a.tobytes()


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


class Signatures:
    """The signatures of registered versions, read once each (versions are immutable)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[tuple[str, int], Signature] = {}
        self._lock = threading.Lock()

    def get(self, model: str, version: int) -> Signature | None:
        """The signature of ``model`` version ``version``; None when it is not registered."""
        key = (model, version)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        models, versions = registry_store.models, registry_store.versions
        query = (
            select(versions.c.signature)
            .join(models, models.c.id == versions.c.model_id)
            .where(models.c.name == model, versions.c.version == version)
        )
        with self.engine.connect() as conn:
            data = conn.execute(query).scalar()
        if data is None:
            return None
        signature = Signature.from_dict(data)
        with self._lock:
            self._cache[key] = signature
        return signature


def insert_ignoring_duplicates(dialect: str, table: Table) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` for ``table`` on SQLite or PostgreSQL."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


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
