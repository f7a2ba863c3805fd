"""What the writer buffers: model batches as the server hands them over.

``ObservedBatch`` is one model batch: the requests' ids (the number ``n`` of a
server-generated id ``<prefix>-<n>``, or the client's own id), their start times, and the
stacked arrays the model saw and answered. ``Capture`` gathers the model batches of one
version into columns as they come (its arrays' rows copied into column buffers); ``Tap``
is the server's way in, one per (model, version, rule): a model batch appended to the open
capture under the writer's lock. ``find_row`` and ``buffered_versions`` find request ids
among buffered batches, for feedback that arrives before its prediction is written.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array

if TYPE_CHECKING:
    from torchops.monitoring._record import RowRule
    from torchops.monitoring.observations import ObservationWriter

__all__ = [
    "MAX_STORED_BYTES",
    "MAX_STORED_ROWS",
    "Capture",
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
#: rows of the buffers of a tap's first capture (later ones: the last one's, plus a quarter)
_FIRST_ROWS = 1024
#: and at most these bytes (rows of images)
_FIRST_BYTES = 16 * 1024 * 1024
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


@dataclass(slots=True, eq=False)
class Capture:
    """Model batches of one version gathered into columns as they come: request ids and
    start times, per model batch its finish times and request count, and the rows of its
    arrays. The writer's observer path appends to one (``add``, under the writer's lock)
    instead of keeping an object per model batch; ``Batch.assemble`` takes the columns
    as they are.

    Nothing of a model batch is kept but copies: its arrays' rows go into column buffers
    (``outputs``, ``inputs``: one array per name, ``capacity`` rows, the first ``size``
    filled, grown by doubling), its start times, and its ids while all are
    server-generated numbers, into machine arrays (``array('d')``, ``array('q')``); a
    client's id turns ``ids`` into a list. The request path's arrays, floats and ints are
    freed with their requests, and a flush holds one copy of the rows, not the batches'
    arrays and then their stacked copy (the writer writes the buffers as they are).
    ``inputs`` is None when the batches keep none."""

    model: str
    version: int
    rule: RowRule | None
    #: rows the column buffers are made with (they double when a batch does not fit)
    capacity: int
    ids: array[int] | list[int | str] = field(default_factory=lambda: array("q"))
    started: array[float] = field(default_factory=lambda: array("d"))
    #: per model batch: when its outputs were ready (monotonic, epoch) and its requests
    done: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    #: rows per request; None while every request has one
    counts: list[int] | None = None
    outputs: dict[str, Array] = field(default_factory=dict)
    inputs: dict[str, Array] | None = None
    #: predicted rows and bytes of arrays held
    size: int = 0
    nbytes: int = 0
    #: the tap that appends to it until the writer takes it
    tap: Tap | None = None

    @classmethod
    def open(
        cls, model: str, version: int, rule: RowRule | None, *, inputs: bool, capacity: int
    ) -> Capture:
        """An empty capture (keeping inputs or not) whose buffers start at ``capacity`` rows."""
        return cls(model, version, rule, max(1, capacity), inputs=({} if inputs else None))

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
        """Append one model batch of ``size`` rows (``inputs`` given iff kept). Raises
        ``ValueError`` when its arrays do not stack with those before (other names, dtypes
        or row shapes) and ``TypeError`` for start times that are not numbers, leaving the
        capture as it was."""
        end = self.size + size
        _fill(self.outputs, outputs, self.size, end, self.capacity)
        if self.inputs is not None:
            _fill(self.inputs, inputs or {}, self.size, end, self.capacity)
        self.started.fromlist(started if type(started) is list else list(started))
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
        self.size = end
        self.nbytes += nbytes

    @classmethod
    def of(cls, group: Sequence[ObservedBatch]) -> Capture:
        """``group`` (same model, version and layout) in columns."""
        first = group[0]
        capture = cls.open(
            first.model, first.version, first.rule, inputs=first.inputs is not None,
            capacity=sum(b.size for b in group),
        )  # fmt: skip
        for b in group:
            nbytes = sum(a.nbytes for a in (*b.outputs.values(), *(b.inputs or {}).values()))
            capture.add(
                b.request_ids, b.rows, b.started, b.done, b.at, b.outputs, b.inputs, b.size, nbytes
            )
        return capture

    def columns(self) -> tuple[dict[str, Array], dict[str, Array] | None]:
        """The filled rows of the outputs and inputs (views of the buffers: rows once
        added are never written again)."""
        rows = slice(0, self.size)
        outputs = {k: v[rows] for k, v in self.outputs.items()}
        return outputs, None if self.inputs is None else {
            k: v[rows] for k, v in self.inputs.items()
        }

    def batches(self) -> list[ObservedBatch]:
        """The model batches again, one ``ObservedBatch`` each (copies of the lists, views
        of the buffers)."""
        result: list[ObservedBatch] = []
        start = row = 0
        for index, n in enumerate(self.requests):
            end = start + n
            counts = None if self.counts is None else self.counts[start:end]
            part = slice(row, row + (n if counts is None else sum(counts)))
            result.append(ObservedBatch(
                self.model, self.version, self.ids[start:end], counts, self.at[index],
                self.started[start:end], self.done[index],
                {k: v[part] for k, v in self.outputs.items()},
                None if self.inputs is None else {k: v[part] for k, v in self.inputs.items()},
                self.rule,
            ))  # fmt: skip
            start, row = end, part.stop
        return result


def _fill(
    columns: dict[str, Array], arrays: Mapping[str, Array], start: int, end: int, capacity: int
) -> None:
    """Copy ``arrays`` into rows ``start:end`` of ``columns`` (made at the first batch with
    ``capacity`` rows, doubled when too small); ``ValueError`` if they do not stack."""
    if not columns:
        for name, a in arrays.items():
            columns[name] = np.empty((max(capacity, end), *a.shape[1:]), a.dtype)
    elif columns.keys() != arrays.keys():
        raise ValueError(f"arrays {sorted(arrays)} do not stack with {sorted(columns)}")
    for name, a in arrays.items():
        column = columns[name]
        if a.dtype != column.dtype or a.shape[1:] != column.shape[1:] or a.shape[0] != end - start:
            raise ValueError(
                f"{name!r} {a.dtype}{list(a.shape)} does not stack with "
                f"{column.dtype}{list(column.shape[1:])}"
            )
    for name, a in arrays.items():
        column = columns[name]
        if end > column.shape[0]:
            grown = np.empty((max(end, 2 * column.shape[0]), *column.shape[1:]), column.dtype)
            grown[:start] = column[:start]
            columns[name] = column = grown
        column[start:end] = a


class Tap:
    """``ObservationWriter.put_rows`` for one (model, version, rule), with what it needs
    at hand: the server's observer calls ``put`` once per model batch on the batcher's
    thread, so it does only what the buffer's bounds need — a row count, a byte count
    (every row of a fixed rule has the same size) — and copies the batch into the open
    capture under the writer's lock. A new capture's buffers are sized from the last one
    the writer took (plus a quarter), so that at a steady rate they are made once per
    flush and never grown. Rules that are not trusted and fixed go through
    ``put_batch`` (checked when written).
    """

    __slots__ = (
        "_captures", "_direct", "_row_bytes", "_rows_taken", "model", "rule", "version", "writer",
    )  # fmt: skip

    def __init__(self, writer: ObservationWriter, model: str, version: int, rule: RowRule):
        self.writer = writer
        self.model = model
        self.version = version
        self.rule = rule
        self._direct = rule.trusted and rule.fixed
        # per "inputs kept" (False, True): the open capture (until the writer takes it),
        # the bytes of one row and the rows of the last capture the writer took
        self._captures: list[Capture | None] = [None, None]
        self._row_bytes = [-1, -1]
        self._rows_taken = [0, 0]

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
        fields = (ids, rows, started, done, at, outputs, inputs, size, nbytes)
        with writer._lock:
            fits = writer._fits(size, nbytes)
            if fits:
                try:
                    capture = self._captures[kept]
                    if (
                        capture is None
                        or capture.size + size > MAX_STORED_ROWS
                        or capture.nbytes + nbytes > MAX_STORED_BYTES
                    ):
                        capture = self._open(kept, size, nbytes)
                    try:
                        capture.add(*fields)
                    except ValueError:  # arrays that do not stack with its: a new capture
                        self._open(kept, size, nbytes).add(*fields)
                except BaseException:  # not placed after all
                    writer._unfit(size, nbytes)
                    raise
        return writer._placed(self.model, size, fits)

    def _open(self, kept: bool, size: int, nbytes: int) -> Capture:
        """A new open capture (queued for the writer) with room for the expected rows."""
        row = max(1, nbytes // max(1, size))
        expected = self._rows_taken[kept] * 5 // 4 or min(_FIRST_ROWS, _FIRST_BYTES // row)
        capacity = max(size, min(expected, MAX_STORED_ROWS, MAX_STORED_BYTES // row))
        capture = Capture.open(self.model, self.version, self.rule, inputs=kept, capacity=capacity)
        capture.tap = self
        self._captures[kept] = capture
        self.writer._queue.append(capture)
        return capture

    def release(self, capture: Capture) -> None:
        """Let go of ``capture`` and detach it (the writer has taken it; the caller holds
        the writer's lock): later batches start a new one, and a tap whose version no
        longer serves keeps no arrays alive."""
        capture.tap = None
        kept = capture.inputs is not None
        self._rows_taken[kept] = capture.size
        if self._captures[kept] is capture:
            self._captures[kept] = None


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
