"""Observations as the writer keeps them: columns of a batch of rows, not one object per row.

The request path hands the writer its model batches (``torchops.monitoring._capture``:
the stacked inputs and outputs the model saw, copied into column buffers, the requests'
ids and start times, no per-row work). A flush turns each version's capture into a
``Batch`` — numpy columns, one entry per predicted row, the arrays views of the buffers
— and stores each as one ``observation_batches`` row:

- ``ids``: safetensors ``numbers`` (int64: ``n`` of a server-generated request id
  ``<prefix>-<n>``, -1 for an id the client chose) and ``parts`` (int32: the row's index
  within a request of several rows, -1 for a request of one row); ``custom_ids``: JSON list
  of the client-chosen ids, one per row whose number is -1;
- ``columns``: safetensors ``at`` (float64 epoch seconds), ``latency`` (float64 seconds),
  ``input_rows`` (int64, the rows whose inputs are kept; absent when all are);
- predictions: none stored for batches the server observed — they follow from the
  outputs by the version's prediction rule (``RowRule``), applied when read; those given
  with ``ObservationWriter.put`` are stored as JSON lists, ``predictions`` and
  ``probas`` (NaN and infinity as null, numpy values unwrapped);
- ``outputs`` / ``inputs``: safetensors of the stacked arrays (inputs of ``input_rows``).

A row's request id is ``<prefix>-<n>`` or the client's id, followed by ``/<part>`` for a
row of a request of several rows. ``Batch.observation(i)`` gives the familiar one-row
``Observation`` back (arrays with a leading dimension of 1).
"""

from __future__ import annotations

import contextlib
import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import orjson

from torchops.errors import InvalidInput
from torchops.monitoring._capture import Capture, ObservedBatch
from torchops.monitoring.store import ID_SPAN, ArrayEncoder, json_text
from torchops.packaging import decode_arrays
from torchops.types import Array

if TYPE_CHECKING:
    from torchops.monitoring._record import RowRule

__all__ = ["Batch", "Observation", "Page", "stored_row_ids"]


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


@dataclass(slots=True)
class Batch:
    """Stored observations of one model version in columns (see the module doc)."""

    model: str
    version: int
    prefix: str | None
    numbers: Array
    parts: Array
    custom: list[str]
    at: Array
    latency: Array
    outputs: dict[str, Array]
    inputs: dict[str, Array] | None
    input_rows: Array | None
    #: predictions given with the observations (JSON values), else None: derived
    given: list[Any] | None = None
    given_proba: list[Any] | None = None
    id: int | None = None
    #: derives the predictions from the outputs (``derive``) when none are stored
    rule: RowRule | None = field(default=None, repr=False)
    #: derived predictions, computed on first use: class indices and probabilities, or
    #: the rows of the first output
    _classes: Array | None = field(default=None, repr=False)
    _proba: Array | None = field(default=None, repr=False)
    _values: Array | None = field(default=None, repr=False)
    _derived: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return self.rows

    _custom_at: Array | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return int(self.numbers.shape[0])

    # -- building ----------------------------------------------------------------------

    @classmethod
    def build(cls, group: Sequence[ObservedBatch], prefix: str | None) -> Batch:
        """One batch from captures of the same model, version and layout."""
        batch = cls.assemble(Capture.of(group), prefix)
        if group[0].rule is None:
            batch._given(group)
        return batch

    @classmethod
    def assemble(cls, capture: Capture, prefix: str | None) -> Batch:
        """The columns of ``capture`` (whose ``rule`` derives the predictions, if any)."""
        ids, counts = capture.ids, capture.counts
        requests = capture.requests
        latency = np.repeat(np.asarray(capture.done), requests) - np.asarray(capture.started)
        at_requests = np.repeat(np.asarray(capture.at, np.float64), requests)
        kinds = {int} if type(ids) is array else set(map(type, ids))
        if kinds <= {int}:  # every id server-generated
            per_request = np.array(ids, np.int64)
            if per_request.size and int(per_request.min()) < 0:
                raise InvalidInput("generated request numbers must be >= 0")
            custom_requests: list[str] = []
        else:
            if int in kinds and any(type(i) is int and i < 0 for i in ids):
                raise InvalidInput("generated request numbers must be >= 0")
            per_request = np.fromiter((i if type(i) is int else -1 for i in ids), np.int64)
            custom_requests = [i for i in ids if type(i) is not int]  # type: ignore[misc]
        count = np.asarray(counts if counts is not None else [], np.int64)
        if counts is None or bool((count == 1).all()):
            numbers = per_request
            parts = np.full(numbers.shape[0], -1, np.int32)
            custom = custom_requests
            at_rows = at_requests
            latency_rows = latency
        else:
            numbers = np.repeat(per_request, count)
            starts = np.repeat(np.cumsum(count) - count, count)
            parts = (np.arange(numbers.shape[0]) - starts).astype(np.int32)
            parts[np.repeat(count == 1, count)] = -1
            custom_count = count[per_request < 0]
            custom = [c for c, k in zip(custom_requests, custom_count.tolist(), strict=True)
                      for _ in range(k)]  # fmt: skip
            at_rows = np.repeat(at_requests, count)
            latency_rows = np.repeat(latency, count)
        outputs, inputs = capture.columns()
        batch = cls(
            capture.model,
            capture.version,
            prefix if bool((numbers >= 0).any()) else None,
            numbers,
            parts,
            custom,
            at_rows,
            latency_rows,
            outputs,
            inputs,
            None,
        )
        batch.rule = capture.rule
        return batch

    def _given(self, group: Sequence[ObservedBatch]) -> None:
        self.given, self.given_proba = [], []
        for b in group:
            n = b.size
            self.given.extend(b.predictions if b.predictions is not None else [None] * n)
            self.given_proba.extend(b.probas if b.probas is not None else [None] * n)

    def _derive(self) -> None:
        """Compute the predictions from the outputs by ``rule`` (once)."""
        if self._derived or self.given is not None:
            return
        self._derived = True
        rule = self.rule
        out = self.outputs.get(rule.output) if rule is not None and rule.output else None
        if rule is None or out is None or out.ndim == 0 or out.shape[0] != self.rows:
            return
        self._classes, self._proba = rule.predict_many(out)
        if self._classes is None:
            self._values = out

    def keep(self, mask: Array) -> Batch:
        """The rows where ``mask`` is true (e.g. without duplicate request ids)."""
        custom_rows = np.flatnonzero(self.numbers < 0)
        kept_custom = set(custom_rows[mask[custom_rows]].tolist())
        custom = [c for r, c in zip(custom_rows.tolist(), self.custom, strict=True)
                  if r in kept_custom]  # fmt: skip
        inputs, input_rows = self.inputs, self.input_rows
        if inputs is not None:
            source_rows = np.arange(self.rows) if input_rows is None else input_rows
            chosen = mask[source_rows]
            inputs = {k: v[chosen] for k, v in inputs.items()}
            renumber = np.cumsum(mask) - 1
            input_rows = renumber[source_rows[chosen]]
        return Batch(
            self.model,
            self.version,
            self.prefix,
            self.numbers[mask],
            self.parts[mask],
            custom,
            self.at[mask],
            self.latency[mask],
            {k: v[mask] for k, v in self.outputs.items()},
            inputs,
            input_rows,
            _pick(self.given, mask),
            _pick(self.given_proba, mask),
            rule=self.rule,
        )

    # -- storing and reading -----------------------------------------------------------

    def encode(self, encoder: ArrayEncoder, *, pieces: bool = False) -> dict[str, Any]:
        """The ``observation_batches`` values of this batch (without ``id``); with
        ``pieces``, ``outputs`` and ``inputs`` are lists of buffers to be written one after
        another (``ArrayEncoder.pieces``: no copy of the arrays) instead of bytes."""
        encode = encoder.pieces if pieces else encoder.encode
        generated = self.numbers[self.numbers >= 0]
        ranged = generated.size and not self.wide  # wide: found through observation_ids
        columns: dict[str, Array] = {"at": self.at, "latency": self.latency}
        if self.input_rows is not None:
            columns["input_rows"] = self.input_rows.astype(np.int64, copy=False)
        ids = {"numbers": self.numbers}
        if bool((self.parts >= 0).any()):
            ids["parts"] = self.parts
        return {
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "first_at": _utc(float(self.at.min())),
            "last_at": _utc(float(self.at.max())),
            "id_prefix": self.prefix if generated.size else None,
            "id_lo": int(generated.min()) if ranged else None,
            "id_hi": int(generated.max()) if ranged else None,
            "ids": encoder.encode(ids),
            "custom_ids": orjson.dumps(self.custom).decode() if self.custom else None,
            "columns": encoder.encode(columns),
            # derived predictions are not stored: they are computed again when read
            "predictions": _json_list(self.given),
            "probas": _json_list(self.given_proba),
            "outputs": encode(self.outputs),
            "inputs": None if self.inputs is None else encode(self.inputs),
        }

    @classmethod
    def decode(
        cls, row: Mapping[Any, Any], *, arrays: bool = True, rule: RowRule | None = None
    ) -> Batch:
        """A stored ``observation_batches`` row; ``arrays=False`` skips the inputs (and the
        outputs, unless the predictions are derived from them by ``rule``)."""
        ids = decode_arrays(row["ids"])
        columns = decode_arrays(row["columns"])
        custom_text = row.get("custom_ids")
        custom = orjson.loads(custom_text) if custom_text else []
        predictions, probas = row.get("predictions"), row.get("probas")
        outputs: dict[str, Array] = {}
        inputs: dict[str, Array] | None = None
        given = predictions is not None
        if arrays or not given:
            outputs = decode_arrays(row["outputs"])
        if arrays:
            raw = row.get("inputs")
            inputs = decode_arrays(raw) if raw is not None else None
        numbers = ids["numbers"]
        return cls(
            row["model"],
            int(row["version"]),
            row.get("id_prefix"),
            numbers,
            ids.get("parts", np.full(numbers.shape[0], -1, np.int32)),
            custom,
            columns["at"],
            columns["latency"],
            outputs,
            inputs,
            columns.get("input_rows"),
            orjson.loads(predictions) if predictions is not None else None,
            orjson.loads(probas) if probas is not None else None,
            int(row["id"]),
            None if given else rule,
        )

    @property
    def wide(self) -> bool:
        """True when the generated numbers span ``ID_SPAN`` or more: then they are indexed
        in ``observation_ids`` like client ids, and the batch records no range."""
        generated = self.numbers[self.numbers >= 0]
        return bool(generated.size) and int(generated.max() - generated.min()) >= ID_SPAN

    def key_rows(self) -> list[dict[str, Any]]:
        """``observation_ids`` rows of this stored batch: its client-chosen request ids
        (and its generated ones when the batch is ``wide``)."""
        rows = np.flatnonzero(self.numbers < 0) if not self.wide else np.arange(self.rows)
        return [
            {
                "model": self.model,
                "request_id": self.row_id(row),
                "batch_id": self.id,
                "row": row,
                "version": self.version,
            }
            for row in rows.tolist()
        ]

    # -- rows ----------------------------------------------------------------------------

    def custom_index(self) -> Array:
        """For each row, its index into ``custom`` (-1 for generated ids)."""
        if self._custom_at is None:
            index = np.cumsum(self.numbers < 0) - 1
            index[self.numbers >= 0] = -1
            self._custom_at = index
        return self._custom_at

    def row_id(self, row: int) -> str:
        """The request id of row ``row``."""
        number = int(self.numbers[row])
        custom = self.custom[self.custom_index()[row]] if number < 0 else ""
        return _name(self.prefix, number, custom, int(self.parts[row]))

    def row_ids(self) -> list[str]:
        return _row_ids(self.prefix, self.numbers, self.parts, self.custom)

    def prediction(self, row: int) -> Any:
        if self.given is not None:
            return self.given[row]
        self._derive()
        if self._classes is not None:
            return int(self._classes[row])
        return None if self._values is None else self._values[row].tolist()

    def proba(self, row: int) -> list[float] | None:
        if self.given_proba is not None:
            value: list[float] | None = self.given_proba[row]
            return value
        self._derive()
        return None if self._proba is None else self._proba[row].tolist()

    def prediction_numbers(self) -> Array:
        """One number per row for prediction drift: the class, else the mean of the row."""
        rule = self.rule
        if self.given is None and rule is not None and rule.output in self.outputs:
            out = self.outputs[rule.output]
            classes = rule.classes_many(out) if out.ndim else None  # no probabilities needed
            if classes is not None:
                return classes.astype(np.float64)
            if out.dtype.kind in "biuf" and out.ndim:
                flat = out.reshape(self.rows, -1).astype(np.float64)
                return flat.mean(axis=1) if flat.shape[1] else np.full(self.rows, math.nan)
        result = np.full(self.rows, math.nan)
        for i, p in enumerate(self.given or ()):
            with contextlib.suppress(TypeError, ValueError):
                result[i] = float(np.mean(np.asarray(p, dtype=np.float64)))
        return result

    def inputs_of(self, row: int) -> dict[str, Array] | None:
        if self.inputs is None:
            return None
        if self.input_rows is None:
            at = row
        else:
            found = np.flatnonzero(self.input_rows == row)
            if not found.size:
                return None
            at = int(found[0])
        return {k: v[at : at + 1] for k, v in self.inputs.items()}

    def observation(self, row: int, label: Any = None, *, arrays: bool = True) -> Observation:
        """Row ``row`` as an ``Observation`` (``arrays=False``: no inputs, empty outputs)."""
        return Observation(
            request_id=self.row_id(row),
            model=self.model,
            version=self.version,
            at=_utc(float(self.at[row])),
            latency_s=float(self.latency[row]),
            outputs={k: v[row : row + 1] for k, v in self.outputs.items()} if arrays else {},
            inputs=self.inputs_of(row) if arrays else None,
            prediction=self.prediction(row),
            proba=self.proba(row),
            label=label,
        )


def stored_row_ids(prefix: str | None, ids: bytes, custom_ids: str | None) -> list[str]:
    """The request ids of a stored batch's rows from its ``ids`` and ``custom_ids`` only."""
    arrays = decode_arrays(ids)
    numbers = arrays["numbers"]
    parts = arrays.get("parts", np.full(numbers.shape[0], -1, np.int32))
    return _row_ids(prefix, numbers, parts, orjson.loads(custom_ids) if custom_ids else [])


def _row_ids(prefix: str | None, numbers: Array, parts: Array, custom: list[str]) -> list[str]:
    """Every row's request id; ``custom`` holds the ids of the rows numbered -1, in order."""
    names = iter(custom)
    return [
        _name(prefix, number, next(names) if number < 0 else "", part)
        for number, part in zip(numbers.tolist(), parts.tolist(), strict=True)
    ]


def _name(prefix: str | None, number: int, custom: str, part: int) -> str:
    """A row's request id: ``<prefix>-<number>`` or the client's, with ``/<part>``."""
    base = f"{prefix}-{number}" if number >= 0 else custom
    return base if part < 0 else f"{base}/{part}"


def _pick(values: list[Any] | None, mask: Array) -> list[Any] | None:
    if values is None:
        return None
    return [v for v, keep in zip(values, mask.tolist(), strict=True) if keep]


def _json_list(values: list[Any] | None) -> str | None:
    """JSON text of a list of values, each as ``json_text`` writes it (NaN → null)."""
    return None if values is None else "[" + ",".join(json_text(v) for v in values) + "]"


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
