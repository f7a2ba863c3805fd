"""Live quality metrics on labelled predictions, cumulative or over a sliding window.

Every metric is kept incrementally: a classifier's confusion matrix (and the sum of its
log-loss terms) or a regressor's sums of squared and absolute errors are added to on
``update`` and subtracted from when rows leave the window — never recomputed by scanning.

Windows (constructor arguments, at most one of them):

- neither → cumulative: every row ever added counts, and none is kept in memory;
- ``window=N`` → the last N labelled rows, in the order they were added;
- ``window_seconds=T`` → the rows whose time ``at`` (unix seconds, the time of the
  prediction; now when not given) is at least ``clock - T``, where the clock is the
  newest ``at`` seen, or ``now`` given to ``metrics``/``expire`` (default: the wall clock)
  when later. Late rows (feedback on old predictions) enter in time order and leave when
  they fall out of the window.

Classification metrics follow scikit-learn: ``accuracy``; ``precision_macro``,
``recall_macro`` and ``f1_macro`` average the per-class values over the classes present
in the window (as true or predicted class), a class with no predictions has precision 0,
one with no true rows recall 0 (``zero_division=0``); ``log_loss`` is the mean of
``-ln(clip(p_true, eps, 1 - eps))`` over the rows given with probabilities, ``eps`` the
machine epsilon of their dtype (1.2e-7 for float32, 2.2e-16 for float64). Per class:
``precision[<label>]``, ``recall[<label>]``, ``f1[<label>]``. Regression: ``mse``,
``rmse``, ``mae`` averaged over every output value. ``count`` is the number of rows in the
window; an empty window reports only ``count``.
"""

from __future__ import annotations

import heapq
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array, Signature

__all__ = ["ClassificationQuality", "RegressionQuality", "make_quality"]

_EPS = float(np.finfo(np.float64).eps)


@dataclass
class _Chunk:
    columns: dict[str, Array]
    at: Array
    start: int = 0

    def take(self, end: int) -> dict[str, Array]:
        part = {k: v[self.start : end] for k, v in self.columns.items()}
        self.start = end
        return part


@dataclass
class _Rows:
    """The rows a sliding window holds, so they can be subtracted when they leave it."""

    window: int | None
    window_seconds: float | None
    size: int = 0
    newest: float = -math.inf
    _queue: deque[_Chunk] = field(default_factory=deque)
    _heap: list[tuple[float, int, _Chunk]] = field(default_factory=list)
    _seq: int = 0

    def add(self, columns: dict[str, Array], at: Array) -> list[dict[str, Array]]:
        if self.window is None and self.window_seconds is None:
            return []
        self.size += len(at)
        if self.window is not None:
            self._queue.append(_Chunk(columns, at))
            return self._evict_count(self.window)
        order = np.argsort(at, kind="stable")
        chunk = _Chunk({k: v[order] for k, v in columns.items()}, at[order])
        self._push(chunk)
        self.newest = max(self.newest, float(chunk.at[-1]))
        return self.expire(self.newest)

    def _push(self, chunk: _Chunk) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (float(chunk.at[chunk.start]), self._seq, chunk))

    def _evict_count(self, window: int) -> list[dict[str, Array]]:
        gone: list[dict[str, Array]] = []
        while self.size > window:
            chunk = self._queue[0]
            k = min(self.size - window, len(chunk.at) - chunk.start)
            gone.append(chunk.take(chunk.start + k))
            self.size -= k
            if chunk.start == len(chunk.at):
                self._queue.popleft()
        return gone

    def expire(self, now: float) -> list[dict[str, Array]]:
        if self.window_seconds is None:
            return []
        cutoff = max(self.newest, now) - self.window_seconds
        gone: list[dict[str, Array]] = []
        while self._heap and self._heap[0][0] < cutoff:
            _, _, chunk = heapq.heappop(self._heap)
            end = int(np.searchsorted(chunk.at, cutoff, side="left"))
            self.size -= end - chunk.start
            gone.append(chunk.take(end))
            if chunk.start < len(chunk.at):
                self._push(chunk)
        return gone


def _window_args(window: int | None, window_seconds: float | None) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise InvalidInput(f"window must be a whole number of rows, got {window!r}")
    if window is not None and window < 1:
        raise InvalidInput(f"window must be at least 1 row, got {window}")
    if window_seconds is not None and (
        isinstance(window_seconds, bool)
        or not isinstance(window_seconds, int | float)
        or not window_seconds > 0
        or not math.isfinite(window_seconds)
    ):
        raise InvalidInput(f"window_seconds must be a positive number, got {window_seconds!r}")
    if window is not None and window_seconds is not None:
        raise InvalidInput("give window (rows) or window_seconds, not both")


def _times(at: Array | None, n: int) -> Array:
    if at is None:
        return np.full(n, time.time())
    times = np.asarray(at, dtype=np.float64).reshape(-1)
    if times.shape[0] != n or not np.all(np.isfinite(times)):
        raise InvalidInput(f"at must hold one finite unix time per row ({n})")
    return times


class _Quality(ABC):
    """The window bookkeeping shared by both trackers; subclasses add and remove rows."""

    def __init__(self, window: int | None, window_seconds: float | None) -> None:
        _window_args(window, window_seconds)
        self.window = window
        self.window_seconds = window_seconds
        self._rows = _Rows(window, window_seconds)
        self._count = 0

    @property
    def count(self) -> int:
        """Rows in the window now (without expiring by the wall clock)."""
        return self._count

    def expire(self, now: float | None = None) -> None:
        """Drop rows older than ``window_seconds`` before ``now`` (default: wall clock)."""
        for part in self._rows.expire(time.time() if now is None else now):
            self._remove(part)

    def _admit(self, columns: dict[str, Array], at: Array) -> None:
        self._add(columns)
        for part in self._rows.add(columns, at):
            self._remove(part)

    @abstractmethod
    def _add(self, columns: dict[str, Array]) -> None: ...

    @abstractmethod
    def _remove(self, columns: dict[str, Array]) -> None: ...


class ClassificationQuality(_Quality):
    """Accuracy, precision, recall, F1 (macro and per class), log loss, confusion matrix."""

    def __init__(
        self,
        n_classes: int,
        labels: Sequence[str] | None = None,
        *,
        window: int | None = None,
        window_seconds: float | None = None,
    ) -> None:
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise InvalidInput(f"n_classes must be an integer ≥ 2, got {n_classes!r}")
        if labels is not None and len(labels) != n_classes:
            raise InvalidInput(f"{len(labels)} labels for {n_classes} classes")
        super().__init__(window, window_seconds)
        self.n_classes = n_classes
        self.labels = tuple(str(x) for x in labels) if labels is not None else None
        self._names = self.labels or tuple(str(i) for i in range(n_classes))
        self._confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
        self._loss = 0.0
        self._loss_rows = 0

    def _classes(self, values: Array, what: str) -> Array:
        array = np.asarray(values)
        if array.ndim != 1 or array.dtype.kind not in "iuf":
            raise InvalidInput(f"{what} must be a 1-d array of class indices")
        if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
            raise InvalidInput(f"{what} must hold whole class indices")
        if array.size and (array.min() < 0 or array.max() >= self.n_classes):
            raise InvalidInput(f"{what}: a class index outside 0..{self.n_classes - 1}")
        return array.astype(np.int64)

    def update(
        self,
        y_true: Array,
        y_pred: Array,
        proba: Array | None = None,
        at: Array | None = None,
    ) -> None:
        """Add labelled rows: true and predicted class indices, optional class
        probabilities ``[n, n_classes]`` and prediction times (unix seconds)."""
        truth = self._classes(y_true, "y_true")
        predicted = self._classes(y_pred, "y_pred")
        n = truth.shape[0]
        if predicted.shape[0] != n:
            raise InvalidInput(f"{n} true classes but {predicted.shape[0]} predictions")
        loss = np.full(n, np.nan)
        if proba is not None:
            given = np.asarray(proba)
            if given.dtype.kind not in "biuf":
                raise InvalidInput(f"proba must hold numbers, got dtype {given.dtype}")
            eps = float(np.finfo(given.dtype).eps) if given.dtype.kind == "f" else _EPS
            probs = given.astype(np.float64)
            if probs.shape != (n, self.n_classes):
                raise InvalidInput(
                    f"proba: expected shape [{n}, {self.n_classes}], got {list(probs.shape)}"
                )
            if not np.all((probs >= 0) & (probs <= 1)):
                raise InvalidInput("proba must hold probabilities in [0, 1]")
            loss = -np.log(np.clip(probs[np.arange(n), truth], eps, 1 - eps))
        times = _times(at, n)
        if n:
            self._admit({"true": truth, "pred": predicted, "loss": loss}, times)

    def _apply(self, columns: dict[str, Array], sign: int) -> None:
        k = self.n_classes
        cells = np.bincount(columns["true"] * k + columns["pred"], minlength=k * k)
        self._confusion += sign * cells.reshape(k, k)
        loss = columns["loss"][~np.isnan(columns["loss"])]
        self._loss_rows += sign * loss.size
        self._loss = 0.0 if self._loss_rows == 0 else self._loss + sign * float(loss.sum())
        self._count += sign * columns["true"].shape[0]

    def _add(self, columns: dict[str, Array]) -> None:
        self._apply(columns, 1)

    def _remove(self, columns: dict[str, Array]) -> None:
        self._apply(columns, -1)

    def confusion(self) -> Array:
        """``[n_classes, n_classes]`` counts, rows = true class, columns = predicted."""
        return self._confusion.copy()

    def metrics(self, now: float | None = None) -> dict[str, float]:
        """The window's metrics (see the module doc); expires time windows first."""
        if self.window_seconds is not None:
            self.expire(now)
        total = int(self._confusion.sum())
        if total == 0:
            return {"count": 0.0}
        matrix = self._confusion.astype(np.float64)
        hits = np.diag(matrix)
        predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
        precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
        recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
        both = precision + recall
        f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
        present = (predicted > 0) | (actual > 0)
        values = {
            "count": float(total),
            "accuracy": float(hits.sum() / total),
            "precision_macro": float(precision[present].mean()),
            "recall_macro": float(recall[present].mean()),
            "f1_macro": float(f1[present].mean()),
        }
        if self._loss_rows > 0:
            values["log_loss"] = max(self._loss, 0.0) / self._loss_rows
        for i, name in enumerate(self._names):
            values[f"precision[{name}]"] = float(precision[i])
            values[f"recall[{name}]"] = float(recall[i])
            values[f"f1[{name}]"] = float(f1[i])
        return values


class RegressionQuality(_Quality):
    """MSE, RMSE and MAE over every output value of the window's rows."""

    def __init__(self, *, window: int | None = None, window_seconds: float | None = None) -> None:
        super().__init__(window, window_seconds)
        self._squared = 0.0
        self._absolute = 0.0
        self._values = 0

    def update(self, y_true: Array, y_pred: Array, at: Array | None = None) -> None:
        """Add labelled rows: targets and predictions of the same shape, ``[n]`` or ``[n, k]``."""
        truth = np.asarray(y_true, dtype=np.float64)
        predicted = np.asarray(y_pred, dtype=np.float64)
        if truth.ndim == 0 or truth.shape != predicted.shape:
            raise InvalidInput(
                f"y_true {list(truth.shape)} and y_pred {list(predicted.shape)} must have the "
                "same shape, one row per prediction"
            )
        if not (np.all(np.isfinite(truth)) and np.all(np.isfinite(predicted))):
            raise InvalidInput("y_true and y_pred must be finite numbers")
        n = truth.shape[0]
        error = (predicted - truth).reshape(n, -1)
        times = _times(at, n)
        if n:
            columns = {
                "squared": np.sum(error**2, axis=1),
                "absolute": np.sum(np.abs(error), axis=1),
                "values": np.full(n, error.shape[1], dtype=np.int64),
            }
            self._admit(columns, times)

    def _apply(self, columns: dict[str, Array], sign: int) -> None:
        self._values += sign * int(columns["values"].sum())
        self._count += sign * columns["values"].shape[0]
        if self._count == 0:
            self._squared = self._absolute = 0.0
            return
        self._squared += sign * float(columns["squared"].sum())
        self._absolute += sign * float(columns["absolute"].sum())

    def _add(self, columns: dict[str, Array]) -> None:
        self._apply(columns, 1)

    def _remove(self, columns: dict[str, Array]) -> None:
        self._apply(columns, -1)

    def metrics(self, now: float | None = None) -> dict[str, float]:
        """``mse``, ``rmse``, ``mae`` and ``count``; expires time windows first."""
        if self.window_seconds is not None:
            self.expire(now)
        if self._count == 0 or self._values == 0:
            return {"count": float(self._count)}
        mse = max(self._squared, 0.0) / self._values
        return {
            "count": float(self._count),
            "mse": mse,
            "rmse": math.sqrt(mse),
            "mae": max(self._absolute, 0.0) / self._values,
        }


def make_quality(
    signature: Signature, *, window: int | None = None, window_seconds: float | None = None
) -> ClassificationQuality | RegressionQuality:
    """The quality tracker for a model: classifiers by class index, anything else as a
    regression on the first output's values."""
    if signature.task != "classification":
        return RegressionQuality(window=window, window_seconds=window_seconds)
    if signature.labels:
        n_classes = len(signature.labels)
    else:
        shape = signature.outputs[0].shape if signature.outputs else ()
        n_classes = shape[-1] if len(shape) >= 2 else 0
        if n_classes < 2:
            raise InvalidInput("a classifier's signature needs labels or a class dimension")
    return ClassificationQuality(
        n_classes, signature.labels, window=window, window_seconds=window_seconds
    )
