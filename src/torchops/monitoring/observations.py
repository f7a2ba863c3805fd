"""Observations: every prediction as the monitor sees it, written off the request path.

``ObservationWriter.tap(model, version, rule).put`` is what the server calls (``put_rows``
does the same for other callers), once per model batch, from the batcher's compute
thread: the stacked inputs and outputs the model saw are copied into the column buffers
of the version's open ``Capture``, and the requests' ids and start times into machine
arrays — no per-row work, no encode, no database call. A background thread takes the
buffer every ``flush_interval_s`` (or sooner once ``batch_size`` rows wait) and stores
each capture as one row of columns (``torchops.monitoring._batches``), its array bytes
written from the buffers as they are: the cost of storing an observation is a share of
one insert and two copies of its bytes. A full buffer (rows or
bytes) drops the observations and counts them (``dropped``, ``on_drop``) rather than
slowing requests.

``put_batch`` takes an ``ObservedBatch`` (checked, and grouped by layout when written) and
``put`` a single ``Observation`` (its ``prediction`` and ``proba`` as given), for
callers outside the server. Request ids must be unique per model: a client-chosen id
that is already stored is dropped (the first observation wins) and counted.

``ObservationStore`` (``torchops.monitoring._observation_store``) reads them back,
joined with their feedback, and applies retention.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, select, text

from torchops.errors import InvalidInput, Unavailable
from torchops.monitoring import store
from torchops.monitoring._batches import Batch, Observation, Page
from torchops.monitoring._capture import (
    MAX_STORED_BYTES,
    MAX_STORED_ROWS,
    Capture,
    ObservedBatch,
    Tap,
    buffered_versions,
    check,
    find_row,
    layout,
)
from torchops.monitoring._observation_store import ObservationStore
from torchops.monitoring._record import RowRule
from torchops.monitoring._segments import SegmentWriter, segment_dir
from torchops.refs import validate_name
from torchops.types import Array

__all__ = ["Observation", "ObservationStore", "ObservationWriter", "ObservedBatch", "Page", "Tap"]

log = logging.getLogger(__name__)

#: request ids checked for duplicates per query
_LOOKUP_CHUNK = 500
#: distinct from the other advisory lock keys
_ADVISORY_LOCK = 7260516


class _Marker:
    """Put in the buffer by ``flush``: set once everything before it is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class ObservationWriter:
    """A bounded buffer of observed batches and the thread that stores them.

    ``max_buffer`` and ``batch_size`` count rows (predictions); ``max_buffer_bytes`` bounds
    the bytes of the arrays buffered (large inputs such as images fill it long before
    ``max_buffer`` rows; the buffers that hold them are made with room for a quarter more
    than the last flush held). ``id_prefix`` is the prefix
    of the server's generated request ids (``<prefix>-<n>``): batches name such requests
    by ``n`` alone. ``on_drop(model, count)`` is called for observations that are dropped
    (buffer full, writer closed, a duplicate request id, or a batch the database refused);
    ``on_write(batches)`` from the writer thread after each flush is committed, with the
    stored ``Batch`` es (e.g. to feed live drift windows).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_buffer: int = 100_000,
        max_buffer_bytes: int = 256 * 1024 * 1024,
        batch_size: int = 10_000,
        flush_interval_s: float = 0.2,
        input_sample_rate: float = 1.0,
        max_input_values: int = 4096,
        id_prefix: str | None = None,
        on_drop: Callable[[str, int], None] | None = None,
        on_write: Callable[[Sequence[Batch]], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if max_buffer < 1 or batch_size < 1 or max_buffer_bytes < 1:
            raise InvalidInput(
                "max_buffer, max_buffer_bytes and batch_size must be at least 1, got "
                f"{max_buffer}, {max_buffer_bytes}, {batch_size}"
            )
        if not flush_interval_s > 0:
            raise InvalidInput(f"flush_interval_s must be positive, got {flush_interval_s}")
        if not 0.0 <= input_sample_rate <= 1.0:
            raise InvalidInput(f"input_sample_rate must be in [0, 1], got {input_sample_rate}")
        if max_input_values < 0:
            raise InvalidInput(f"max_input_values must be >= 0, got {max_input_values}")
        if id_prefix is not None and not 0 < len(id_prefix) <= 64:
            raise InvalidInput(f"id_prefix must be 1-64 characters, got {id_prefix!r}")
        self.engine = engine
        self.max_buffer = max_buffer
        self.max_buffer_bytes = max_buffer_bytes
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.input_sample_rate = input_sample_rate
        self.max_input_values = max_input_values
        self.id_prefix = id_prefix
        self.on_drop = on_drop
        self.on_write = on_write
        self.seed = seed
        store.ensure_tables(engine)
        self._queue: deque[ObservedBatch | Capture | _Marker] = deque()
        # the ``Tap`` of each (model, version, rule) asked for (``tap``, ``put_rows``)
        self._taps: dict[tuple[str, int, RowRule], Tap] = {}
        # guards the row count and the hand-over from the queue to ``_inflight``;
        # ``pending`` reads both under it
        self._lock = threading.Lock()
        self._buffered = 0
        self._buffered_bytes = 0
        self._inflight: list[ObservedBatch | Capture] = []
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        self._dropped = 0
        self._written = 0
        self._rng = random.Random(seed)
        self._encoder = store.ArrayEncoder()
        self._valid_models: set[str] = set()
        directory = segment_dir(engine)
        # array bytes go to segment files beside a file-backed SQLite database
        self._segments = None if directory is None else SegmentWriter(engine, directory)

    def __repr__(self) -> str:
        return (
            f"ObservationWriter(max_buffer={self.max_buffer}, batch_size={self.batch_size}, "
            f"flush_interval_s={self.flush_interval_s}, "
            f"input_sample_rate={self.input_sample_rate}, id_prefix={self.id_prefix!r})"
        )

    # -- the hot path ------------------------------------------------------------------

    def put_batch(self, batch: ObservedBatch) -> bool:
        """Buffer ``batch`` for writing; False (and counted as dropped) when it does not fit."""
        rows = len(batch.request_ids) if batch.rows is None else sum(batch.rows)
        with self._lock:
            fits = self._fits(rows, _nbytes(batch))
            if fits:
                self._queue.append(batch)
        return self._placed(batch.model, rows, fits)

    def put_rows(
        self,
        model: str,
        version: int,
        rule: RowRule,
        ids: Sequence[int | str],
        rows: Sequence[int] | None,
        started: Sequence[float],
        done: float,
        at: float,
        outputs: Mapping[str, Array],
        inputs: Mapping[str, Array] | None,
    ) -> bool:
        """Buffer one model batch (the fields of ``ObservedBatch``): ``tap(model, version,
        rule).put(...)``. False (and counted as dropped) when it does not fit."""
        return self.tap(model, version, rule).put(ids, rows, started, done, at, outputs, inputs)

    def tap(self, model: str, version: int, rule: RowRule) -> Tap:
        """The way in for the model batches of one batcher (the server's observer holds one
        per version): ``Tap.put`` appends a batch to the version's open ``Capture``."""
        key = (model, version, rule)
        tap = self._taps.get(key)
        if tap is None:
            if len(self._taps) >= 1024:  # callers that make a rule per call
                self._taps.clear()
            tap = self._taps[key] = Tap(self, model, version, rule)
        return tap

    def _fits(self, rows: int, nbytes: int) -> bool:
        """Count ``rows`` (``nbytes`` of arrays) into the buffer, if it is open and they fit;
        the caller holds the lock and places them when this says they fit."""
        if (
            self._closed
            or self._buffered + rows > self.max_buffer
            or self._buffered_bytes + nbytes > self.max_buffer_bytes
        ):
            return False
        self._buffered += rows
        self._buffered_bytes += nbytes
        return True

    def _unfit(self, rows: int, nbytes: int) -> None:
        """Undo ``_fits`` for rows that could not be placed after all (the caller holds
        the lock)."""
        self._buffered -= rows
        self._buffered_bytes -= nbytes

    def _placed(self, model: str, rows: int, fits: bool) -> bool:
        """After ``_fits`` (outside the lock): count the rows as dropped if they did not
        fit, or wake the writer once ``batch_size`` rows wait."""
        if not fits:
            self._drop({model: rows})
            return False
        if self._buffered >= self.batch_size and not self._wake.is_set():
            self._wake.set()
        return True

    def put(self, obs: Observation) -> bool:
        """Buffer one observation (its ``prediction`` and ``proba`` as given)."""
        try:
            if not isinstance(obs.at, datetime) or obs.at.tzinfo is None:
                raise InvalidInput(f"observation time must be timezone-aware, got {obs.at!r}")
            batch = ObservedBatch(
                obs.model,
                int(obs.version),
                [obs.request_id],
                None,
                obs.at.timestamp(),
                [0.0],
                float(obs.latency_s),
                _one_row(obs.outputs) or {},
                _one_row(self._sampled(dict(obs.inputs))) if obs.inputs else None,
                predictions=[obs.prediction],
                probas=[obs.proba],
            )
        except Exception as exc:
            log.warning("dropping observation %r of %s: %s", obs.request_id, obs.model, exc)
            self._drop({str(obs.model): 1})
            return False
        return self.put_batch(batch)

    def _sampled(self, inputs: dict[str, Array] | None) -> dict[str, Array] | None:
        if inputs is None or self.input_sample_rate >= 1.0:
            return inputs
        per_row = sum(int(a.size) for a in inputs.values()) / max(1, _leading(inputs))
        if per_row > self.max_input_values and self._rng.random() >= self.input_sample_rate:
            return None
        return inputs

    # -- state -------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Observations dropped since the writer was made."""
        return self._dropped

    @property
    def written(self) -> int:
        """Observations written to the database since the writer was made."""
        return self._written

    @property
    def buffered(self) -> int:
        """Observations waiting in the buffer (not counting those being written)."""
        return self._buffered

    @property
    def buffered_bytes(self) -> int:
        """Bytes of arrays waiting in the buffer (not counting those being written)."""
        return self._buffered_bytes

    def pending(self, model: str, request_id: str) -> Observation | None:
        """The buffered or in-flight observation ``request_id`` of ``model``, if any."""
        for batch in self._pending_batches(model):
            row = find_row(batch, request_id, self.id_prefix)
            if row is not None:
                return Batch.build([batch], self.id_prefix).observation(row)
        return None

    def pending_ids(self, model: str) -> set[str]:
        """Request ids of ``model`` buffered or being written but not committed yet."""
        ids: set[str] = set()
        for batch in self._pending_batches(model):
            ids.update(Batch.build([batch], self.id_prefix).row_ids())
        return ids

    def pending_versions(self, model: str, request_ids: Iterable[str]) -> dict[str, int]:
        """``request id -> version`` of those of ``request_ids`` buffered or in flight."""
        wanted = set(request_ids)
        if not wanted:
            return {}
        return buffered_versions(self._pending_batches(model), wanted, self.id_prefix)

    def _pending_batches(self, model: str) -> list[ObservedBatch]:
        found: list[ObservedBatch] = []
        with self._lock:  # captures grow under it: their lists are copied under it too
            for item in (*self._queue, *self._inflight):
                if isinstance(item, _Marker) or item.model != model:
                    continue
                if isinstance(item, Capture):
                    found.extend(item.batches())
                else:
                    found.append(item)
        return found

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._closed:
            raise Unavailable("the observation writer is closed")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="torchops-observations", daemon=True)
        self._thread.start()

    def flush(self, timeout: float | None = None) -> None:
        """Return once every observation put before this call is written (or dropped)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._drain()
            return
        marker = _Marker()
        self._queue.append(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            raise Unavailable(f"observations were not written within {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        """Write what is buffered, stop the thread; later ``put`` calls drop."""
        with self._lock:
            self._closed = True
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._drain()
            if self._segments is not None:
                with self._drain_lock:
                    self._segments.close()

    # -- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._drain(everything=stopping)
                if self._segments is not None:
                    self._segments.tick()  # synced every few seconds, busy or idle
            except Exception:  # never let the thread die; the rows were already counted
                log.exception("observation writer failed")
            if stopping:
                return

    def _drain(self, *, everything: bool = True) -> None:
        """Write what is buffered: all of it (``flush``, ``close``), or, from the writer's
        own loop, until no ``flush`` waits and fewer than ``batch_size`` rows are left:
        rows that came during a write wait for the next interval rather than being
        stored as one more small batch (each stored batch costs its transaction)."""
        with self._drain_lock:
            while True:
                taken, markers = self._take()
                if not taken and not markers:
                    return
                try:
                    if taken:
                        self._write(taken)
                finally:
                    with self._lock:
                        self._inflight = []
                    for marker in markers:
                        marker.done.set()
                if not (everything or markers or self._buffered >= self.batch_size):
                    return

    def _take(self) -> tuple[list[ObservedBatch | Capture], list[_Marker]]:
        taken: list[ObservedBatch | Capture] = []
        markers: list[_Marker] = []
        queue = self._queue
        with self._lock:
            self._inflight = taken
            while queue:
                item = queue.popleft()
                if isinstance(item, _Marker):
                    markers.append(item)
                    break  # what came before the marker is written before it is set
                if isinstance(item, Capture):
                    if item.tap is not None:
                        item.tap.release(item)  # rows from now on go to a new one
                    if not item.size:  # opened for a batch that could not be added
                        continue
                taken.append(item)
                self._buffered -= item.size
                self._buffered_bytes -= item.nbytes if isinstance(item, Capture) else _nbytes(item)
        return taken, markers

    def _write(self, taken: list[ObservedBatch | Capture]) -> None:
        kept: list[Batch] = []
        if self._segments is not None:
            self._segments.ready()  # outside the transactions: it may open a new segment
        parts: list[Capture | list[ObservedBatch]] = [t for t in taken if isinstance(t, Capture)]
        parts.extend(self._groups([t for t in taken if not isinstance(t, Capture)]))
        for part in parts:
            try:
                if isinstance(part, Capture):
                    model, rows = part.model, part.size
                    batch = Batch.assemble(part, self.id_prefix)
                else:
                    model, rows = part[0].model, _rows(part)
                    batch = Batch.build(part, self.id_prefix)
                values = batch.encode(self._encoder, pieces=True)
            except Exception as exc:  # e.g. arrays safetensors cannot hold: these alone
                log.warning("dropping %d observations of %s: %s", rows, model, exc)
                self._drop({model: rows})
                continue
            try:  # one transaction per stored batch: a refused one loses only its rows
                with store.writer(self.engine).begin() as conn:
                    batch = self._store(conn, batch, values)
            except Exception:
                log.exception("could not write %d observations of %s; dropping them", rows, model)
                self._drop({model: batch.rows})
                continue
            if batch.rows:
                kept.append(batch)
        self._written += sum(b.rows for b in kept)
        if self.on_write is not None and kept:
            try:
                self.on_write(kept)
            except Exception:
                log.exception("on_write callback failed")

    def _groups(self, taken: list[ObservedBatch]) -> list[list[ObservedBatch]]:
        """``taken`` grouped by what can be stacked, each group at most MAX_STORED_ROWS rows
        and (unless one batch alone is bigger) MAX_STORED_BYTES of arrays."""
        groups: dict[tuple[Any, ...], list[list[ObservedBatch]]] = {}
        sizes: dict[tuple[Any, ...], tuple[int, int]] = {}
        for batch in taken:
            size = batch.size
            rule = batch.rule
            try:
                if rule is not None and rule.trusted and rule.fixed:
                    # from a batcher: checked by construction, and every batch of a
                    # signature without variable dimensions past the first stacks
                    key: tuple[Any, ...] = (
                        batch.model,
                        batch.version,
                        id(rule),
                        batch.inputs is None,
                    )
                else:
                    self._check(batch)
                    key = (
                        batch.model,
                        batch.version,
                        id(rule),
                        layout(batch.outputs),
                        None if batch.inputs is None else layout(batch.inputs),
                    )
                nbytes = _nbytes(batch)
            except Exception as exc:
                log.warning("dropping observations of %r: %s", batch.model, exc)
                self._drop({str(batch.model): size})
                continue
            chunks = groups.setdefault(key, [[]])
            rows, stored = sizes.get(key, (0, 0))
            if chunks[-1] and (rows + size > MAX_STORED_ROWS or stored + nbytes > MAX_STORED_BYTES):
                chunks.append([])
                rows, stored = 0, 0
            chunks[-1].append(batch)
            sizes[key] = (rows + size, stored + nbytes)
        return [chunk for chunks in groups.values() for chunk in chunks]

    def _check(self, batch: ObservedBatch) -> None:
        # checked here, off the request path, so one bad batch cannot sink the others
        if type(batch.model) is not str or batch.model not in self._valid_models:
            validate_name(batch.model)
            if len(self._valid_models) >= 1024:
                self._valid_models.clear()
            self._valid_models.add(batch.model)
        check(batch)
        if self.id_prefix is None and any(type(i) is int for i in batch.request_ids):
            raise InvalidInput("generated request numbers need a writer with an id_prefix")

    def _store(self, conn: Connection, batch: Batch, values: dict[str, Any]) -> Batch:
        """Insert ``batch`` (without rows whose client-chosen id is already stored)."""
        custom_rows = np.flatnonzero(batch.numbers < 0)
        if custom_rows.size:
            if conn.dialect.name == "postgresql":  # workers writing the same model wait
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key, hashtext(:model))"),
                    {"key": _ADVISORY_LOCK, "model": batch.model},
                )
            ids = [batch.row_id(int(r)) for r in custom_rows]
            taken = self._stored_ids(conn, batch.model, ids)
            keep = np.ones(batch.rows, dtype=bool)
            seen: set[str] = set()
            for row, rid in zip(custom_rows.tolist(), ids, strict=True):
                if rid in taken or rid in seen:
                    keep[row] = False
                seen.add(rid)
            if not keep.all():
                lost = int((~keep).sum())
                log.warning(
                    "dropping %d observations of %s whose request id was already stored",
                    lost,
                    batch.model,
                )
                self._drop({batch.model: lost})
                batch = batch.keep(keep)
                values = batch.encode(self._encoder, pieces=True)
        if not batch.rows:
            return batch
        # the new id as the driver reports it (SQLite's last rowid; PostgreSQL's RETURNING):
        # with an explicit RETURNING, SQLite wrote a statement journal (a temporary file
        # with the original of each page the insert changed) on every flush, 13-30% more
        # CPU per stored byte (measured)
        if self._segments is not None and self._segments.open:
            values.update(self._segments.append(values["outputs"], values["inputs"]))
        else:  # the array bytes go in the row
            for key in ("outputs", "inputs"):
                if values[key] is not None:
                    values[key] = b"".join(values[key])
        inserted = conn.execute(store.observation_batches.insert(), values).inserted_primary_key
        if inserted is None or inserted[0] is None:
            raise RuntimeError("the database did not report the id of the stored batch")
        batch.id = int(inserted[0])
        keys = batch.key_rows()
        if keys:
            conn.execute(store.observation_ids.insert(), keys)
        return batch

    def _stored_ids(self, conn: Connection, model: str, ids: list[str]) -> set[str]:
        keys = store.observation_ids
        found: set[str] = set()
        unique = sorted(set(ids))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start : start + _LOOKUP_CHUNK]
            query = select(keys.c.request_id).where(
                keys.c.model == model, keys.c.request_id.in_(chunk)
            )
            found.update(conn.execute(query).scalars())
        return found

    def _drop(self, counts: dict[str, int]) -> None:
        with self._lock:
            self._dropped += sum(counts.values())
        if self.on_drop is not None:
            for model, count in counts.items():
                try:
                    self.on_drop(model, count)
                except Exception:
                    log.exception("on_drop callback failed")


def _nbytes(batch: ObservedBatch) -> int:
    """Bytes of the batch's arrays (what is not an array counts 0: checked when written)."""
    try:
        arrays = (*batch.outputs.values(), *(batch.inputs or {}).values())
        return sum(int(getattr(a, "nbytes", 0)) for a in arrays)
    except (AttributeError, TypeError, ValueError):
        return 0


def _rows(batches: Sequence[ObservedBatch]) -> int:
    return sum(b.size for b in batches)


def _leading(arrays: dict[str, Array]) -> int:
    """Rows of the first array (1 for a scalar)."""
    first = next(iter(arrays.values()))
    return int(first.shape[0]) if first.ndim else 1


def _one_row(arrays: dict[str, Array] | None) -> dict[str, Array] | None:
    """One observation's arrays with a leading row dimension of 1."""
    if arrays is None:
        return None
    result: dict[str, Array] = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        result[name] = array if array.ndim and array.shape[0] == 1 else array[None]
    return result
