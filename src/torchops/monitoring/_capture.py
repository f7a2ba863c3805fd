"""What the writer buffers: model batches as the server hands them over.

``ObservedBatch`` is one model batch: the requests' ids (the number ``n`` of a
server-generated id ``<prefix>-<n>``, or the client's own id), their start times, and the
stacked arrays the model saw and answered. ``Capture`` gathers the model batches of one
version into columns as they come; ``Tap`` is the server's way in, one per (model,
version, rule): a model batch appended to the open capture under the writer's lock, a few
list operations and a copy of its rows into the capture's ``Columns``. ``find_row`` and
``buffered_versions`` find request ids among buffered batches, for feedback that arrives
before its prediction is written.

Why copy: the request path's arrays (the stacked inputs, the model's outputs) are then
freed as soon as the batch is answered, as they are without monitoring, and the next
batch's arrays reuse that memory while it is still in the CPU's caches. Holding them
until the writer takes them (a few thousand batches) spread every allocation of the
serving threads over cold memory: 0.8 µs more CPU per request on the 32 µs ``mlp``
request of ``bench/monitor.py``, against 0.3 µs for the copy into columns whose buffers
the writer gives back to the tap once it has stored them (measured, same run).
"""

from __future__ import annotations

import logging
import math
import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torchops.monitoring._record import RowRule
    from torchops.monitoring.observations import ObservationWriter

__all__ = [
    "MAX_STORED_BYTES",
    "MAX_STORED_ROWS",
    "Capture",
    "Columns",
    "ObservedBatch",
    "Tap",
    "buffered_versions",
    "check",
    "find_row",
    "layout",
    "parse_generated",
]

#: the most rows one stored batch holds (a read cursor counts rows within a batch in 20 bits)
MAX_STORED_ROWS = 65_536
#: the most array bytes one stored batch holds (SQLite and PostgreSQL cap a value at 1 GB)
MAX_STORED_BYTES = 256 * 1024 * 1024
#: a server-generated request id: ``<prefix>-<n>`` with an optional ``/<part>``
_GENERATED = re.compile(r"^(.+)-(\d{1,18})(?:/(\d{1,9}))?$")


@dataclass(slots=True)
class ObservedBatch:
    """One batch of predictions as the server made it, handed to the writer as it is.

    ``request_ids``: one per request, the number ``n`` of a server-generated id
    (``<prefix>-<n>``, the writer's prefix) or the client's own id; ``rows``: rows per
    request (None: one each); ``at``: epoch seconds when the outputs were ready;
    ``started``: per request, when it arrived, and ``done``, when its outputs were ready
    (both ``time.monotonic()``: the latency is their difference); ``outputs`` /
    ``inputs``: the stacked arrays, one row per predicted row (``inputs`` None when not
    kept). ``rule`` turns the first output into predictions; without one,
    ``predictions`` and ``probas`` give them per row.
    """

    model: str
    version: int
    request_ids: Sequence[int | str]
    rows: Sequence[int] | None
    at: float
    started: Sequence[float]
    done: float
    outputs: Mapping[str, Array]
    inputs: Mapping[str, Array] | None
    rule: RowRule | None = None
    predictions: Sequence[Any] | None = None
    probas: Sequence[list[float] | None] | None = None

    @property
    def size(self) -> int:
        """Predicted rows in the batch."""
        return len(self.request_ids) if self.rows is None else int(sum(self.rows))


class Columns:
    """Arrays with the same names, dtypes and row shapes, appended row-wise into buffers
    that grow by doubling (``arrays``: the buffers, ``rows``: how many rows are filled).
    ``spare`` (buffers an earlier capture is done with) is filled again rather than
    allocating new ones."""

    __slots__ = ("arrays", "capacity", "rows")

    def __init__(self, spare: dict[str, Array] | None = None) -> None:
        self.arrays: dict[str, Array] = spare or {}
        self.capacity = next(iter(self.arrays.values())).shape[0] if self.arrays else 0
        self.rows = 0

    def append(self, arrays: Mapping[str, Array], n: int) -> None:
        """Copy ``arrays`` (``n`` rows each) after the filled rows; ``ValueError`` (and
        nothing changed) when their names, dtypes or row shapes are not the columns'."""
        if self.arrays and not _fits_layout(self.arrays, arrays, n):
            if self.rows:
                raise ValueError(
                    f"arrays {_describe(arrays)} do not stack with {_describe(self.arrays)}"
                )
            self.arrays, self.capacity = {}, 0  # a spare of another layout
        if not self.arrays and not _fits_layout(arrays, arrays, n):
            raise ValueError(f"arrays {_describe(arrays)} do not all have {n} rows")
        start, end = self.rows, self.rows + n
        if end > self.capacity:
            self._grow(arrays, end)
        buffers = self.arrays
        for name, a in arrays.items():
            buffers[name][start:end] = a
        self.rows = end

    def _grow(self, arrays: Mapping[str, Array], rows: int) -> None:
        """Buffers for at least ``rows`` rows (twice the old ones, up to the rows and bytes
        one stored batch may hold), the filled rows copied over."""
        old = self.arrays
        row_bytes = sum(a.itemsize * math.prod(a.shape[1:]) for a in arrays.values()) or 1
        ceiling = max(1, min(MAX_STORED_ROWS, MAX_STORED_BYTES // row_bytes))
        capacity = max(rows, min(2 * self.capacity, ceiling), min(32, ceiling))
        grown: dict[str, Array] = {}
        for name, a in arrays.items():
            grown[name] = np.empty((capacity, *a.shape[1:]), a.dtype)
            if self.rows:
                grown[name][: self.rows] = old[name][: self.rows]
        self.arrays, self.capacity = grown, capacity

    def view(self) -> dict[str, Array]:
        """The filled rows (views of the buffers)."""
        rows = self.rows
        return {name: a[:rows] for name, a in self.arrays.items()}


def _fits_layout(columns: Mapping[str, Array], arrays: Mapping[str, Array], n: int) -> bool:
    """True when ``arrays`` are ``n`` rows of the names, dtypes and row shapes of
    ``columns``."""
    if columns.keys() != arrays.keys():
        return False
    for name, c in columns.items():
        a = arrays[name]
        if a.dtype != c.dtype or a.ndim == 0 or a.shape != (n, *c.shape[1:]):
            return False
    return True


def _describe(arrays: Mapping[str, Array]) -> str:
    return ", ".join(f"{k} {a.dtype} {tuple(a.shape)}" for k, a in arrays.items())


@dataclass(slots=True, eq=False)
class Capture:
    """Model batches of one version gathered into columns as they come: request ids and
    start times, per model batch its finish times, request count and rows, and the
    arrays copied into ``Columns``. The writer's observer path appends to one (``add``,
    under the writer's lock) instead of keeping an object per model batch;
    ``Batch.assemble`` makes the stored columns from it. ``inputs`` is None when the
    batches keep none.

    Start times, and the ids while all are server-generated numbers, are copied into
    machine arrays (``array('d')``, ``array('q')``) as they come rather than kept as
    Python objects: the request path's floats and ints are freed with their requests,
    and the writer reads two buffers instead of visiting thousands of objects that have
    long left the CPU's caches. A client's id turns ``ids`` into a list."""

    model: str
    version: int
    rule: RowRule | None
    inputs: Columns | None
    outputs: Columns = field(default_factory=Columns)
    ids: array[int] | list[int | str] = field(default_factory=lambda: array("q"))
    started: array[float] = field(default_factory=lambda: array("d"))
    #: per model batch: when its outputs were ready (monotonic, epoch), its requests, rows
    done: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    #: rows per request; None while every request has one
    counts: list[int] | None = None
    #: predicted rows and bytes of arrays held
    size: int = 0
    nbytes: int = 0
    #: the tap that appends to it until the writer takes it
    tap: Tap | None = None
    #: the tap it came from, which gets its buffers back once it is stored
    owner: Tap | None = None

    def add(
        self,
        ids: Sequence[int | str],
        rows: Sequence[int] | None,
        started: Sequence[float],
        done: float,
        at: float,
        outputs: Mapping[str, Array],
        inputs: Mapping[str, Array] | None,
        size: int,
        nbytes: int,
    ) -> None:
        """Append one model batch of ``size`` rows (``inputs`` given iff kept); when it
        raises (arrays of another layout, start times that are not numbers), the capture
        is left as it was."""
        filled = self.outputs.rows
        self.outputs.append(outputs, size)
        try:
            if self.inputs is not None:
                self.inputs.append(inputs, size)  # type: ignore[arg-type]
            self.started.fromlist(started if type(started) is list else list(started))
        except BaseException:
            self.outputs.rows = filled
            if self.inputs is not None:
                self.inputs.rows = filled
            raise
        if rows is not None and self.counts is None:
            self.counts = [1] * len(self.ids)
        if self.counts is not None:
            self.counts.extend(rows if rows is not None else [1] * len(ids))
        column = self.ids
        if isinstance(column, list):
            column.extend(ids)
        else:
            numbers = cast("list[int]", ids if type(ids) is list else list(ids))
            try:  # all or nothing: fromlist leaves the array as it was when it fails
                column.fromlist(numbers)
            except (TypeError, OverflowError):  # a client's id (or no int64): a list
                self.ids = [*column.tolist(), *ids]
        self.done.append(done)
        self.at.append(at)
        self.requests.append(len(ids))
        self.sizes.append(size)
        self.size += size
        self.nbytes += nbytes

    @classmethod
    def of(cls, group: Sequence[ObservedBatch]) -> Capture:
        """``group`` (same model, version and layout) in columns."""
        first = group[0]
        inputs = None if first.inputs is None else Columns()
        capture = cls(first.model, first.version, first.rule, inputs)
        for b in group:
            nbytes = sum(a.nbytes for a in (*b.outputs.values(), *(b.inputs or {}).values()))
            capture.add(
                b.request_ids, b.rows, b.started, b.done, b.at, b.outputs, b.inputs, b.size, nbytes
            )
        return capture

    def batches(self) -> list[ObservedBatch]:
        """The model batches again, one ``ObservedBatch`` each (copies: the columns'
        buffers are filled again once the writer is done with them)."""
        result: list[ObservedBatch] = []
        start = row = 0
        outputs = self.outputs.view()
        inputs = None if self.inputs is None else self.inputs.view()
        for index, n in enumerate(self.requests):
            end, last = start + n, row + self.sizes[index]
            result.append(ObservedBatch(
                self.model, self.version, self.ids[start:end],
                None if self.counts is None else self.counts[start:end], self.at[index],
                self.started[start:end], self.done[index],
                {k: v[row:last].copy() for k, v in outputs.items()},
                None if inputs is None else {k: v[row:last].copy() for k, v in inputs.items()},
                self.rule,
            ))  # fmt: skip
            start, row = end, last
        return result


class Tap:
    """``ObservationWriter.put_rows`` for one (model, version, rule), with what it needs
    at hand: the server's observer calls ``put`` once per model batch on the batcher's
    thread, so it does only what the buffer's bounds need — a row count, a byte count
    (every row of a fixed rule has the same size), a few appends and a copy of the rows
    under the writer's lock. Rules that are not trusted and fixed go through
    ``put_batch`` (checked when written).
    """

    __slots__ = (
        "_captures", "_direct", "_row_bytes", "_spares", "model", "rule", "version", "writer"
    )  # fmt: skip

    def __init__(self, writer: ObservationWriter, model: str, version: int, rule: RowRule):
        self.writer = writer
        self.model = model
        self.version = version
        self.rule = rule
        self._direct = rule.trusted and rule.fixed
        # per "inputs kept" (False, True): the open capture (until the writer takes it),
        # the bytes of one row, and the buffers of a stored capture to fill again
        self._captures: list[Capture | None] = [None, None]
        self._row_bytes = [-1, -1]
        self._spares: list[tuple[dict[str, Array], dict[str, Array] | None] | None] = [None, None]

    def put(
        self,
        ids: Sequence[int | str],
        rows: Sequence[int] | None,
        started: Sequence[float],
        done: float,
        at: float,
        outputs: Mapping[str, Array],
        inputs: Mapping[str, Array] | None,
    ) -> bool:
        """Buffer one model batch; False (and counted as dropped) when it does not fit."""
        writer = self.writer
        if not self._direct:
            batch = ObservedBatch(
                self.model, self.version, ids, rows, at, started, done, outputs, inputs, self.rule
            )  # fmt: skip
            return writer.put_batch(batch)
        size = len(ids) if rows is None else sum(rows)
        kept = inputs is not None
        row_bytes = self._row_bytes[kept]
        if row_bytes < 0:
            held = sum(a.nbytes for a in (*outputs.values(), *(inputs or {}).values()))
            row_bytes = held // max(1, size)
            if size:
                self._row_bytes[kept] = row_bytes
        nbytes = size * row_bytes
        with writer._lock:
            fits = writer._fits(size, nbytes)
            if fits:
                capture = self._captures[kept]
                if (
                    capture is None
                    or capture.size + size > MAX_STORED_ROWS
                    or capture.nbytes + nbytes > MAX_STORED_BYTES
                ):
                    capture = self._open(kept)
                    writer._queue.append(capture)
                try:
                    capture.add(ids, rows, started, done, at, outputs, inputs, size, nbytes)
                except Exception as exc:  # not the layout of this version's batches
                    writer._unfit(size, nbytes)
                    fits = False
                    log.warning("not observing a batch of %s: %s", self.model, exc)
        return writer._placed(self.model, size, fits)

    def _open(self, kept: bool) -> Capture:
        """A new open capture (the caller holds the writer's lock), on the spare buffers."""
        spare = self._spares[kept]
        self._spares[kept] = None
        outputs, inputs = spare if spare is not None else (None, None)
        capture = Capture(
            self.model, self.version, self.rule, Columns(inputs) if kept else None,
            Columns(outputs),
        )  # fmt: skip
        capture.tap = capture.owner = self
        self._captures[kept] = capture
        return capture

    def release(self, capture: Capture) -> None:
        """Let go of ``capture`` and detach it (the writer has taken it; the caller holds
        the writer's lock): later batches start a new one."""
        capture.tap = None
        kept = capture.inputs is not None
        if self._captures[kept] is capture:
            self._captures[kept] = None

    def recycle(self, capture: Capture) -> None:
        """Take back the buffers of ``capture``, which the writer has stored (the caller
        holds the writer's lock), for the next capture to fill — while batches still
        come: a tap with no open capture keeps no buffers, so a version that no longer
        serves holds no memory."""
        kept = capture.inputs is not None
        if self._captures[kept] is None:
            self._spares[kept] = None
            return
        inputs = None if capture.inputs is None else capture.inputs.arrays
        self._spares[kept] = (capture.outputs.arrays, inputs)


def parse_generated(request_id: str) -> tuple[str, int, int] | None:
    """``(prefix, n, part)`` of a request id shaped like a generated one (part -1: none)."""
    match = _GENERATED.match(request_id)
    if match is None:
        return None
    prefix, number, part = match.groups()
    return prefix, int(number), -1 if part is None else int(part)


def layout(arrays: Mapping[str, Array] | None) -> tuple[tuple[str, Any, tuple[int, ...]], ...]:
    """Names, dtypes and row shapes of stacked arrays: batches with equal layouts stack."""
    if arrays is None:
        return ()
    return tuple([(name, a.dtype, a.shape[1:]) for name, a in arrays.items()])


def check(batch: ObservedBatch) -> None:
    """``InvalidInput`` unless ``batch`` can be stored (checked off the request path)."""
    n = batch.size
    if len(batch.started) != len(batch.request_ids):
        raise InvalidInput("an observed batch needs one start time per request")
    if batch.rows is not None and len(batch.rows) != len(batch.request_ids):
        raise InvalidInput("an observed batch needs a row count per request")
    for i in batch.request_ids:
        if type(i) is not int and (not isinstance(i, str) or not 0 < len(i) <= 256):
            raise InvalidInput(f"request id must be 1-256 characters: {i!r}")
    for kind, arrays in (("outputs", batch.outputs), ("inputs", batch.inputs or {})):
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray) or a.ndim == 0 or a.shape[0] != n:
                raise InvalidInput(f"{kind} {name!r} must be an array of {n} rows")
    if not (math.isfinite(batch.at) and math.isfinite(batch.done)):
        raise InvalidInput(f"observation time must be finite, got {batch.at!r}")


def buffered_versions(
    batches: Sequence[ObservedBatch], request_ids: set[str], prefix: str | None
) -> dict[str, int]:
    """``request id -> version`` of those of ``request_ids`` that rows of ``batches`` have
    (ids generated with ``prefix`` are matched by number)."""
    found: dict[str, int] = {}
    numbers: dict[int, list[tuple[str, int]]] = {}
    names: dict[str, list[tuple[str, int]]] = {}
    for rid in request_ids:
        part = -1
        base = rid
        slash = rid.rfind("/")
        if slash > 0 and rid[slash + 1 :].isdigit():
            base, part = rid[:slash], int(rid[slash + 1 :])
        names.setdefault(base, []).append((rid, part))
        parsed = parse_generated(rid)
        if parsed is not None and parsed[0] == prefix:
            numbers.setdefault(parsed[1], []).append((rid, parsed[2]))
    for batch in batches:
        counts = batch.rows
        for index, key in enumerate(batch.request_ids):
            hits = numbers.get(key) if type(key) is int else names.get(key)  # type: ignore[arg-type]
            if not hits:
                continue
            count = 1 if counts is None else counts[index]
            for rid, part in hits:
                if (part < 0 and count == 1) or (count > 1 and 0 <= part < count):
                    found.setdefault(rid, batch.version)
    return found


def find_row(batch: ObservedBatch, request_id: str, prefix: str | None) -> int | None:
    """The row of ``request_id`` in ``batch``, if it is there (generated ids: ``prefix``)."""
    parsed = parse_generated(request_id)
    start = 0
    for index, key in enumerate(batch.request_ids):
        count = 1 if batch.rows is None else batch.rows[index]
        for part in range(count) if count > 1 else (-1,):
            if type(key) is int:
                hit = (
                    parsed is not None
                    and parsed[0] == prefix
                    and parsed[1] == key
                    and parsed[2] == part
                )
            else:
                hit = request_id == (key if part < 0 else f"{key}/{part}")
            if hit:
                return start + max(part, 0)
        start += count
    return None
