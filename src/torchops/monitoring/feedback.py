"""Feedback: the true target of a prediction, given by its request id, checked and stored once.

Feedback is stored in its own table and joined to observations on read, so it may arrive
the moment a prediction returns (its observation still in the writer's buffer) or hours
later, after a restart. A target is checked against the signature of the version that
made the prediction and stored in a normal form:

* classification — an ``int`` class index in range, or one of ``signature.labels``
  (stored as its index);
* regression and other tasks — a number, or a (nested) list of numbers shaped like one row
  of the first output (``shape[1:]``, ``-1`` matching any size); stored as floats.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError

from torchops.errors import Conflict, InvalidInput, NotFound, TorchopsError
from torchops.monitoring import store
from torchops.monitoring.observations import ObservationStore, ObservationWriter
from torchops.refs import validate_name
from torchops.registry.store import utcnow
from torchops.types import Signature

__all__ = ["FeedbackResult", "FeedbackStore", "normalize_target"]

#: PostgreSQL advisory lock class taken by feedback writers of one model: ids then commit
#: in the order they are given, so ``labelled`` cursors never step over a later commit
_ADVISORY_LOCK = 7260515
_MAX_ID = 256


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """What ``add_many`` stored: how many items, and ``(index, message)`` for each refused."""

    accepted: int
    errors: list[tuple[int, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "errors": [{"index": i, "error": message} for i, message in self.errors],
        }


class FeedbackStore:
    """Adds feedback for stored or buffered predictions (``writer``: the server's writer)."""

    def __init__(self, engine: Engine, writer: ObservationWriter | None = None) -> None:
        self.engine = engine
        self.writer = writer
        self.observations = ObservationStore(engine)
        store.ensure_tables(engine)
        self.signatures = store.Signatures(engine)

    def add(self, model: str, request_id: str, target: Any, *, source: str = "api") -> None:
        """Record ``target`` for the prediction ``request_id`` of ``model``.

        NotFound when no such prediction is stored or buffered, Conflict when it already has
        feedback, InvalidInput when the target does not fit the model's output.
        """
        validate_name(model)
        _check_request_id(request_id)
        _check_source(source)
        version = self._versions(model, [request_id]).get(request_id)
        if version is None:
            raise NotFound(_unknown(model, request_id))
        stored = normalize_target(self._signature(model, version), target, request_id)
        row = {"model": model, "request_id": request_id, "target": stored, "source": source}
        try:
            with store.writer(self.engine).begin() as conn:
                _serialise(conn, model)
                conn.execute(store.feedback.insert(), [{**row, "at": utcnow()}])
        except IntegrityError:
            raise Conflict(_duplicate(model, request_id)) from None

    def add_many(
        self, model: str, items: Sequence[tuple[str, Any]], *, source: str = "api"
    ) -> FeedbackResult:
        """Add ``(request_id, target)`` pairs, each accepted or refused on its own."""
        validate_name(model)
        _check_source(source)
        errors: dict[int, str] = {}
        pairs: dict[int, tuple[str, Any]] = {}
        for index, item in enumerate(items):
            try:
                request_id, target = item
                _check_request_id(request_id)
            except (TypeError, ValueError):
                errors[index] = f"item {index}: expected a (request id, target) pair"
                continue
            except TorchopsError as exc:
                errors[index] = exc.message
                continue
            pairs[index] = (request_id, target)
        versions = self._versions(model, [rid for rid, _ in pairs.values()])
        rows: dict[str, dict[str, Any]] = {}
        first_index: dict[str, int] = {}
        now = utcnow()
        for index, (request_id, target) in pairs.items():
            version = versions.get(request_id)
            if version is None:
                errors[index] = _unknown(model, request_id)
                continue
            if request_id in rows:
                errors[index] = _duplicate(model, request_id)
                continue
            try:
                stored = normalize_target(self._signature(model, version), target, request_id)
            except TorchopsError as exc:
                errors[index] = exc.message
                continue
            first_index[request_id] = index
            rows[request_id] = {
                "model": model,
                "request_id": request_id,
                "target": stored,
                "at": now,
                "source": source,
            }
        accepted = 0
        if rows:
            insert = store.insert_ignoring_duplicates(self.engine.dialect.name, store.feedback)
            with store.writer(self.engine).begin() as conn:
                _serialise(conn, model)
                result = conn.execute(
                    insert.returning(store.feedback.c.request_id), list(rows.values())
                )
                inserted = {r[0] for r in result}
            accepted = len(inserted)
            for request_id in rows.keys() - inserted:
                errors[first_index[request_id]] = _duplicate(model, request_id)
        return FeedbackResult(accepted, sorted(errors.items()))

    # -- helpers -----------------------------------------------------------------------

    def _versions(self, model: str, request_ids: Sequence[str]) -> dict[str, int]:
        """``request id -> version`` for the predictions that are stored or buffered."""
        wanted = set(request_ids)
        found = self.observations.versions(model, wanted)
        missing = wanted - found.keys()
        if missing and self.writer is not None:
            found.update(self.writer.pending_versions(model, missing))
            missing -= found.keys()
            if missing:
                # written between the first look and the writer's snapshot
                found.update(self.observations.versions(model, missing))
        return found

    def _signature(self, model: str, version: int) -> Signature:
        signature = self.signatures.get(model, version)
        if signature is None:
            raise NotFound(
                f"model {model!r} version {version} is not in the registry (deleted?): "
                "its feedback cannot be checked"
            )
        return signature


def normalize_target(signature: Signature, target: Any, request_id: str = "") -> Any:
    """``target`` checked against ``signature`` in its stored form, else InvalidInput."""
    where = f"feedback for request id {request_id!r}" if request_id else "feedback"
    if signature.task == "classification":
        return _class_index(signature, target, where)
    return _numeric(signature, target, where)


def _class_index(signature: Signature, target: Any, where: str) -> int:
    labels = signature.labels
    n_classes: int | None = len(labels) if labels else None
    if n_classes is None and signature.outputs:
        shape = signature.outputs[0].shape
        n_classes = shape[-1] if len(shape) >= 2 and shape[-1] > 0 else None
    index: int | None = None
    if isinstance(target, str):
        if labels and target in labels:
            return labels.index(target)
        known = f"one of {list(labels)[:20]}" if labels else "a class index"
        raise InvalidInput(f"{where}: unknown class label {target!r}; expected {known}")
    if isinstance(target, numbers.Real) and not isinstance(target, bool | np.bool_):
        number = float(target)
        if number.is_integer():
            index = int(number)
    if index is None:
        raise InvalidInput(
            f"{where}: a classifier's target must be a class index or label, got {_show(target)}"
        )
    if index < 0 or (n_classes is not None and index >= n_classes):
        limit = f"0..{n_classes - 1}" if n_classes is not None else ">= 0"
        raise InvalidInput(f"{where}: class index {index} out of range {limit}")
    return index


def _numeric(signature: Signature, target: Any, where: str) -> Any:
    if not signature.outputs:
        raise InvalidInput(f"{where}: the model has no outputs to compare a target with")
    output = signature.outputs[0]
    row_shape = output.shape[1:]
    expected = f"a number or a list of shape {list(row_shape)} (one row of {output.name!r})"
    if isinstance(target, bool | np.bool_ | str | bytes) or target is None:
        raise InvalidInput(f"{where}: expected {expected}, got {_show(target)}")
    try:
        array = np.asarray(target, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: expected {expected}, got {_show(target)}") from None
    if array.ndim == 0:
        if any(d not in (1, -1) for d in row_shape):
            raise InvalidInput(f"{where}: expected {expected}, got the single number {target!r}")
    elif array.ndim != len(row_shape) or any(
        d != -1 and d != n for d, n in zip(row_shape, array.shape, strict=True)
    ):
        raise InvalidInput(f"{where}: expected {expected}, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidInput(f"{where}: the target must be finite, got {_show(target)}")
    value: Any = array.tolist()
    return value


def _serialise(conn: Connection, model: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:key, hashtext(:model))"),
            {"key": _ADVISORY_LOCK, "model": model},
        )


def _check_request_id(request_id: Any) -> None:
    if not isinstance(request_id, str) or not request_id or len(request_id) > _MAX_ID:
        raise InvalidInput(
            f"a request id must be a non-empty string of at most {_MAX_ID} characters, "
            f"got {_show(request_id)}"
        )


def _check_source(source: Any) -> None:
    if not isinstance(source, str) or not 0 < len(source) <= 64:
        raise InvalidInput(f"feedback source must be a short non-empty string, got {source!r}")


def _unknown(model: str, request_id: str) -> str:
    return (
        f"no prediction with request id {request_id!r} for model {model!r} "
        "(unknown id, dropped, or removed by retention)"
    )


def _duplicate(model: str, request_id: str) -> str:
    return f"feedback for request id {request_id!r} of model {model!r} was already given"


def _show(value: Any) -> str:
    text_ = repr(value)
    return text_ if len(text_) <= 80 else text_[:77] + "..."
