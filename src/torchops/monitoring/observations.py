"""Observations: every prediction as the monitor sees it, written off the request path.

``ObservationWriter.put`` is what the server calls for each prediction, on its event
loop: a length check and a deque append, never a lock, an encode or a database call.
A background thread takes the buffer in batches, encodes arrays (safetensors) and JSON
values (orjson) itself and writes each batch with one ``executemany`` on the raw DBAPI
connection: no SQLAlchemy statement or type processing per row. A full buffer drops the
observation and counts it (``dropped``, ``on_drop``) rather than slowing the request.

An observation describes one predicted row; ``prediction`` is what quality metrics need
without decoding arrays (a class index for a classifier, a number or list of numbers for
a regressor) and ``proba`` the class probabilities when there are any.

``ObservationStore`` reads them back, joined with their feedback, and applies retention.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Engine, Row, and_, exists, func, or_, select

from torchops.errors import InvalidInput, Unavailable
from torchops.monitoring import store
from torchops.packaging import decode_arrays
from torchops.refs import validate_name
from torchops.registry.store import utcnow
from torchops.types import Array

__all__ = ["Observation", "ObservationStore", "ObservationWriter", "Page"]

log = logging.getLogger(__name__)

#: rows deleted per transaction by retention, so writers are never locked out for long
_RETENTION_CHUNK = 2000
#: the longest request id stored (the column's size)
_MAX_ID = 256
#: no observation time seen yet (``None`` is an invalid time that must still be checked)
_UNSET = object()


@dataclass(frozen=True, slots=True)
class Observation:
    """One prediction: who asked, what came out, (sampled) what went in, and later its label."""

    request_id: str
    model: str
    version: int
    at: datetime
    latency_s: float
    outputs: dict[str, Array]
    inputs: dict[str, Array] | None
    prediction: Any
    proba: list[float] | None
    label: Any = None


class Page(NamedTuple):
    """Observations read from the store and the cursor to pass as ``since_id`` next time."""

    observations: list[Observation]
    cursor: int


class _Marker:
    """Put in the buffer by ``flush``: set once everything before it is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class ObservationWriter:
    """A bounded buffer of observations and the thread that writes them in batches.

    ``on_drop(model, count)`` is called for observations that are dropped (buffer full,
    writer closed, or a batch the database refused); ``on_write(observations)`` from the
    writer thread after each committed batch, e.g. to feed live drift windows.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_buffer: int = 100_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        input_sample_rate: float = 1.0,
        max_input_values: int = 4096,
        on_drop: Callable[[str, int], None] | None = None,
        on_write: Callable[[Sequence[Observation]], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if max_buffer < 1 or batch_size < 1:
            raise InvalidInput(
                f"max_buffer and batch_size must be at least 1, got {max_buffer}, {batch_size}"
            )
        if not flush_interval_s > 0:
            raise InvalidInput(f"flush_interval_s must be positive, got {flush_interval_s}")
        if not 0.0 <= input_sample_rate <= 1.0:
            raise InvalidInput(f"input_sample_rate must be in [0, 1], got {input_sample_rate}")
        if max_input_values < 0:
            raise InvalidInput(f"max_input_values must be >= 0, got {max_input_values}")
        self.engine = engine
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.input_sample_rate = input_sample_rate
        self.max_input_values = max_input_values
        self.on_drop = on_drop
        self.on_write = on_write
        self.seed = seed
        store.ensure_tables(engine)
        self._queue: deque[Observation | _Marker] = deque()
        # taken by the writer while it moves rows from the queue to ``_inflight`` and when
        # it clears ``_inflight`` after the commit; ``pending`` reads both under it. ``put``
        # never takes it.
        self._lock = threading.Lock()
        self._inflight: list[Observation] = []
        self._drain_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        self._dropped = 0
        self._written = 0
        self._rng = random.Random(seed)
        self._encoder = store.ArrayEncoder()
        self._sqlite = engine.dialect.name == "sqlite"
        # per-row work the writer skips when a value repeats: model names already checked,
        # and the last ``at`` converted (every row of one request shares it)
        self._valid_models: set[str] = set()
        self._last_at: tuple[object, Any] = (_UNSET, None)
        self._insert_sql = store.raw_insert_ignoring_duplicates(engine.dialect.name)

    def __repr__(self) -> str:
        return (
            f"ObservationWriter(max_buffer={self.max_buffer}, batch_size={self.batch_size}, "
            f"flush_interval_s={self.flush_interval_s}, "
            f"input_sample_rate={self.input_sample_rate})"
        )

    # -- the hot path ------------------------------------------------------------------

    def put(self, obs: Observation) -> bool:
        """Buffer ``obs`` for writing; False (and counted as dropped) when the buffer is full."""
        queue = self._queue
        size = len(queue)
        if size >= self.max_buffer or self._closed:
            self._drop({obs.model: 1})
            return False
        queue.append(obs)
        if size + 1 >= self.batch_size and not self._wake.is_set():
            self._wake.set()
        return True

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
        """Observations waiting in the buffer (not counting the batch being written)."""
        return len(self._queue)

    def pending(self, model: str, request_id: str) -> Observation | None:
        """The buffered or in-flight observation ``request_id`` of ``model``, if any."""
        for obs in self._pending_snapshot():
            if obs.request_id == request_id and obs.model == model:
                return obs
        return None

    def pending_ids(self, model: str) -> set[str]:
        """Request ids of ``model`` buffered or being written but not committed yet."""
        return {obs.request_id for obs in self._pending_snapshot() if obs.model == model}

    def pending_versions(self, model: str) -> dict[str, int]:
        """``request id -> version`` of ``model``'s buffered or in-flight observations."""
        return {
            obs.request_id: obs.version for obs in self._pending_snapshot() if obs.model == model
        }

    def _pending_snapshot(self) -> list[Observation]:
        with self._lock:
            # deque.copy runs in C without releasing the GIL: a consistent snapshot even
            # while ``put`` appends from another thread
            queued = self._queue.copy()
            inflight = list(self._inflight)
        return [o for o in queued if isinstance(o, Observation)] + inflight

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
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._drain()

    # -- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._drain()
            except Exception:  # never let the thread die; the batch was already counted
                log.exception("observation writer failed")
            if stopping:
                return

    def _drain(self) -> None:
        with self._drain_lock:
            while True:
                batch, markers = self._take()
                if not batch and not markers:
                    return
                try:
                    if batch:
                        self._write(batch)
                finally:
                    with self._lock:
                        self._inflight = []
                    for marker in markers:
                        marker.done.set()

    def _take(self) -> tuple[list[Observation], list[_Marker]]:
        batch: list[Observation] = []
        markers: list[_Marker] = []
        queue = self._queue
        with self._lock:
            self._inflight = batch
            while queue and len(batch) < self.batch_size:
                item = queue.popleft()
                if isinstance(item, _Marker):
                    markers.append(item)
                    break  # what came before the marker is written before it is set
                batch.append(item)
        return batch, markers

    def _write(self, batch: list[Observation]) -> None:
        rows: list[tuple[Any, ...]] = []
        kept: list[Observation] = []
        failed: Counter[str] = Counter()
        for obs in batch:
            try:
                rows.append(self._row(obs))
                kept.append(obs)
            except Exception as exc:
                log.warning("dropping observation %r of %s: %s", obs.request_id, obs.model, exc)
                failed[obs.model] += 1
        if failed:
            self._drop(failed)
        if not rows:
            return
        try:
            inserted = self._insert(rows)
        except Exception:
            log.exception("could not write %d observations; dropping them", len(rows))
            self._drop(Counter(obs.model for obs in kept))
            return
        if inserted is not None:
            # a request id already stored for the model: the first observation wins
            duplicates = [o for o, new in zip(kept, inserted, strict=True) if not new]
            log.warning(
                "dropping %d observations whose request id was already stored (e.g. %r)",
                len(duplicates),
                duplicates[0].request_id,
            )
            self._drop(Counter(o.model for o in duplicates))
            kept = [o for o, new in zip(kept, inserted, strict=True) if new]
        with self._counts_lock:
            self._written += len(kept)
        if self.on_write is not None and kept:
            try:
                self.on_write(kept)
            except Exception:
                log.exception("on_write callback failed")

    def _insert(self, rows: list[tuple[Any, ...]]) -> list[bool] | None:
        """Insert ``rows``, skipping stored request ids: None if all went in, else which."""
        return store.execute_many_ignoring_duplicates(self.engine, self._insert_sql, rows)

    def _row(self, obs: Observation) -> tuple[Any, ...]:
        """``obs`` as the insert's parameters, in ``store.RAW_INSERT_COLUMNS`` order."""
        # checked here, off the request path, so one bad observation cannot sink its batch
        model = obs.model
        if type(model) is not str or model not in self._valid_models:
            validate_name(model)
            if len(self._valid_models) >= 1024:
                self._valid_models.clear()
            self._valid_models.add(model)
        if not isinstance(obs.request_id, str) or not 0 < len(obs.request_id) <= _MAX_ID:
            raise InvalidInput(f"request id must be 1-{_MAX_ID} characters: {obs.request_id!r}")
        last_at, at = self._last_at
        if obs.at is not last_at:
            if not isinstance(obs.at, datetime) or obs.at.tzinfo is None:
                raise InvalidInput(f"observation time must be timezone-aware, got {obs.at!r}")
            utc = obs.at.astimezone(UTC)
            # SQLite: naive UTC text laid out as SQLAlchemy's DateTime stores and compares it
            at = utc.replace(tzinfo=None).isoformat(" ", "microseconds") if self._sqlite else utc
            self._last_at = (obs.at, at)
        return (
            model,
            int(obs.version),
            obs.request_id,
            at,
            float(obs.latency_s),
            self._encoder.encode(obs.outputs),
            self._sampled_inputs(obs.inputs),
            store.json_text(obs.prediction),
            store.json_text(obs.proba),
        )

    def _sampled_inputs(self, inputs: dict[str, Array] | None) -> bytes | None:
        if not inputs:
            return None
        if self.input_sample_rate < 1.0:
            values = sum(int(getattr(a, "size", 1)) for a in inputs.values())
            shape: tuple[int, ...] = tuple(getattr(next(iter(inputs.values())), "shape", ()))
            rows = shape[0] if shape and shape[0] > 0 else 1
            if values / rows > self.max_input_values and self._rng.random() >= (
                self.input_sample_rate
            ):
                return None
        return self._encoder.encode(inputs)

    def _drop(self, counts: dict[str, int]) -> None:
        with self._counts_lock:
            self._dropped += sum(counts.values())
        if self.on_drop is not None:
            for model, count in counts.items():
                try:
                    self.on_drop(model, count)
                except Exception:
                    log.exception("on_drop callback failed")


class ObservationStore:
    """Reads stored observations (joined with their feedback) and applies retention.

    ``join_grace_s``: feedback younger than this whose observation is not stored yet
    (it was still in a writer's buffer) holds the ``labelled`` cursor so it is not skipped;
    older unjoined feedback (its observation was dropped) no longer does.
    """

    def __init__(self, engine: Engine, *, join_grace_s: float = 60.0) -> None:
        self.engine = engine
        self.join_grace_s = join_grace_s
        store.ensure_tables(engine)

    def get(self, model: str, request_id: str) -> Observation | None:
        """The observation ``request_id`` of ``model`` with its label, or None."""
        o, f = store.observations, store.feedback
        query = (
            select(*o.c, f.c.target)
            .select_from(o.outerjoin(f, _joined()))
            .where(o.c.model == validate_name(model), o.c.request_id == request_id)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else _observation(row, row.target, arrays=True)

    def observations(
        self,
        model: str,
        version: int | None = None,
        *,
        since: datetime | None = None,
        since_id: int = 0,
        limit: int | None = None,
        arrays: bool = True,
    ) -> Page:
        """Observations of ``model`` in the order they were written, labelled or not.

        ``since``: only those made at or after that time; ``since_id``: a previous page's
        cursor; ``arrays=False`` skips decoding inputs and outputs (``outputs`` is then
        empty), which is all quality metrics need.
        """
        o, f = store.observations, store.feedback
        columns = [c for c in o.c if arrays or c.name not in ("inputs", "outputs")]
        query = (
            select(*columns, f.c.target)
            .select_from(o.outerjoin(f, _joined()))
            .where(o.c.model == validate_name(model), o.c.id > since_id)
        )
        if version is not None:
            query = query.where(o.c.version == version)
        if since is not None:
            query = query.where(o.c.at >= since)
        query = query.order_by(o.c.id).limit(_limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        result = [_observation(row, row.target, arrays=arrays) for row in rows]
        return Page(result, rows[-1].id if rows else since_id)

    def labelled(
        self,
        model: str,
        version: int | None = None,
        *,
        since_id: int = 0,
        limit: int | None = None,
        arrays: bool = True,
    ) -> Page:
        """Observations that have feedback, in the order the feedback arrived.

        Pass the returned cursor as ``since_id`` to read only what arrived since; feedback
        whose observation is still being written is returned on a later call, not skipped.
        """
        o, f = store.observations, store.feedback
        columns = [c for c in o.c if arrays or c.name not in ("inputs", "outputs")]
        query = (
            select(*columns, f.c.id.label("feedback_id"), f.c.target, f.c.at.label("given_at"))
            .select_from(f.outerjoin(o, _joined()))
            .where(f.c.model == validate_name(model), f.c.id > since_id)
        )
        if version is not None:
            query = query.where(or_(o.c.version == version, o.c.id.is_(None)))
        query = query.order_by(f.c.id).limit(_limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        recent = utcnow() - timedelta(seconds=self.join_grace_s)
        result: list[Observation] = []
        cursor = since_id
        for row in rows:
            if row.id is None:  # its observation is not stored (yet)
                if row.given_at > recent:
                    break
            else:
                result.append(_observation(row, row.target, arrays=arrays))
            cursor = row.feedback_id
        return Page(result, cursor)

    def count(self, model: str, version: int | None = None, *, labelled: bool = False) -> int:
        """How many observations of ``model`` are stored (only those with feedback)."""
        o = store.observations
        query = select(func.count()).select_from(o).where(o.c.model == validate_name(model))
        if labelled:
            query = query.where(exists().where(_joined()))
        if version is not None:
            query = query.where(o.c.version == version)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def apply_retention(self, max_age: timedelta | None = None, max_rows: int | None = None) -> int:
        """Delete observations older than ``max_age`` and all but the newest ``max_rows``
        of each model, with their feedback; returns how many observations were deleted."""
        o = store.observations
        deleted = 0
        if max_age is not None:
            if not isinstance(max_age, timedelta) or max_age <= timedelta(0):
                raise InvalidInput(f"max_age must be a positive timedelta, got {max_age!r}")
            deleted += self._delete_where(o.c.at < utcnow() - max_age)
        if max_rows is not None:
            if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
                raise InvalidInput(f"max_rows must be an integer >= 0, got {max_rows!r}")
            with self.engine.connect() as conn:
                models = list(conn.execute(select(o.c.model).distinct()).scalars())
            for model in models:
                with self.engine.connect() as conn:
                    newest_dropped = conn.execute(
                        select(o.c.id)
                        .where(o.c.model == model)
                        .order_by(o.c.id.desc())
                        .offset(max_rows)
                        .limit(1)
                    ).scalar()
                if newest_dropped is not None:
                    deleted += self._delete_where(
                        and_(o.c.model == model, o.c.id <= newest_dropped)
                    )
        return deleted

    def _delete_where(self, condition: Any) -> int:
        o, f = store.observations, store.feedback
        total = 0
        while True:
            with store.writer(self.engine).begin() as conn:
                ids = list(
                    conn.execute(
                        select(o.c.id).where(condition).order_by(o.c.id).limit(_RETENTION_CHUNK)
                    ).scalars()
                )
                if not ids:
                    return total
                conn.execute(f.delete().where(exists().where(_joined(), o.c.id.in_(ids))))
                conn.execute(o.delete().where(o.c.id.in_(ids)))
            total += len(ids)


def _joined() -> Any:
    o, f = store.observations, store.feedback
    return and_(o.c.model == f.c.model, o.c.request_id == f.c.request_id)


def _limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
    return limit


def _observation(row: Row[Any, *tuple[Any, ...]], label: Any, *, arrays: bool) -> Observation:
    mapping = row._mapping
    outputs: dict[str, Array] = {}
    inputs: dict[str, Array] | None = None
    if arrays:
        outputs = decode_arrays(mapping["outputs"])
        raw = mapping["inputs"]
        inputs = decode_arrays(raw) if raw is not None else None
    return Observation(
        request_id=mapping["request_id"],
        model=mapping["model"],
        version=mapping["version"],
        at=mapping["at"],
        latency_s=mapping["latency_s"],
        outputs=outputs,
        inputs=inputs,
        prediction=mapping["prediction"],
        proba=mapping["proba"],
        label=label,
    )
