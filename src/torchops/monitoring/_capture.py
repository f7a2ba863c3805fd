"""What the writer buffers: model batches as the server hands them over.

``ObservedBatch`` is one model batch: the requests' ids (the number ``n`` of a
server-generated id ``<prefix>-<n>``, or the client's own id), their start times, and the
stacked arrays the model saw and answered. ``Capture`` gathers the model batches of one
version into columns as they come; ``Tap`` is the server's way in, one per (model,
version, rule): a model batch appended to the open capture under the writer's lock, a few
list operations. ``find_row`` and ``buffered_versions`` find request ids among buffered
batches, for feedback that arrives before its prediction is written.
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
    start times, per model batch its finish times, request count and arrays. The
    writer's observer path appends to one (``add``, a few list operations under the
    writer's lock) instead of keeping an object per model batch; ``Batch.assemble`` makes
    the stored columns from it. ``inputs`` is None when the batches keep none.

    Start times, and the ids while all are server-generated numbers, are copied into
    machine arrays (``array('d')``, ``array('q')``) as they come rather than kept as
    Python objects: the request path's floats and ints are freed with their requests,
    and the writer reads two buffers instead of visiting thousands of objects that have
    long left the CPU's caches. A client's id turns ``ids`` into a list."""

    model: str
    version: int
    rule: RowRule | None
    inputs: list[Mapping[str, Array]] | None
    ids: array[int] | list[int | str] = field(default_factory=lambda: array("q"))
    started: array[float] = field(default_factory=lambda: array("d"))
    #: per model batch: when its outputs were ready (monotonic, epoch) and its requests
    done: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    #: rows per request; None while every request has one
    counts: list[int] | None = None
    outputs: list[Mapping[str, Array]] = field(default_factory=list)
    #: predicted rows and bytes of arrays held
    size: int = 0
    nbytes: int = 0
    #: the tap that appends to it until the writer takes it
    tap: Tap | None = None

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
        """Append one model batch of ``size`` rows (``inputs`` given iff kept)."""
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
        self.outputs.append(outputs)
        if self.inputs is not None:
            self.inputs.append(inputs)  # type: ignore[arg-type]
        self.size += size
        self.nbytes += nbytes

    @classmethod
    def of(cls, group: Sequence[ObservedBatch]) -> Capture:
        """``group`` (same model, version and layout) in columns."""
        first = group[0]
        capture = cls(first.model, first.version, first.rule, None if first.inputs is None else [])
        for b in group:
            nbytes = sum(a.nbytes for a in (*b.outputs.values(), *(b.inputs or {}).values()))
            capture.add(
                b.request_ids, b.rows, b.started, b.done, b.at, b.outputs, b.inputs, b.size, nbytes
            )
        return capture

    def batches(self) -> list[ObservedBatch]:
        """The model batches again, one ``ObservedBatch`` each (a copy of the lists)."""
        result: list[ObservedBatch] = []
        start = 0
        for index, n in enumerate(self.requests):
            end = start + n
            result.append(ObservedBatch(
                self.model, self.version, self.ids[start:end],
                None if self.counts is None else self.counts[start:end], self.at[index],
                self.started[start:end], self.done[index], self.outputs[index],
                None if self.inputs is None else self.inputs[index], self.rule,
            ))  # fmt: skip
            start = end
        return result


class Tap:
    """``ObservationWriter.put_rows`` for one (model, version, rule), with what it needs
    at hand: the server's observer calls ``put`` once per model batch on the batcher's
    thread, so it does only what the buffer's bounds need — a row count, a byte count
    (every row of a fixed rule has the same size), a few appends under the writer's lock.
    Rules that are not trusted and fixed go through ``put_batch`` (checked when written).
    """

    __slots__ = ("_captures", "_direct", "_row_bytes", "model", "rule", "version", "writer")

    def __init__(self, writer: ObservationWriter, model: str, version: int, rule: RowRule):
        self.writer = writer
        self.model = model
        self.version = version
        self.rule = rule
        self._direct = rule.trusted and rule.fixed
        # per "inputs kept" (False, True): the open capture (until the writer takes it)
        # and the bytes of one row
        self._captures: list[Capture | None] = [None, None]
        self._row_bytes = [-1, -1]

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
        # views of other objects (a runtime's torch tensors) are copied: a buffered tensor
        # would be traversed by every garbage collection of the process until written
        outputs = {k: v if v.base is None else np.array(v) for k, v in outputs.items()}
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
                    capture = Capture(self.model, self.version, self.rule, [] if kept else None)
                    capture.tap = self
                    self._captures[kept] = capture
                    writer._queue.append(capture)
                capture.add(ids, rows, started, done, at, outputs, inputs, size, nbytes)
        return writer._placed(self.model, size, fits)

    def release(self, capture: Capture) -> None:
        """Let go of ``capture`` and detach it (the writer has taken it; the caller holds
        the writer's lock): later batches start a new one, and a tap whose version no
        longer serves keeps no arrays alive."""
        capture.tap = None
        kept = capture.inputs is not None
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
