"""How a served version's outputs become observations: the per-row prediction rule.

Used on the request path, so it is plain Python on one row (faster than numpy for the few
values a row of class scores holds) and cached per version.

The rule, for the first output of the signature, one row at a time:

- classification, a row of ``k`` scores → ``prediction`` is the index of the largest score;
  ``proba`` is the row itself when it already is a probability vector (every value in
  [0, 1] and the sum within ``PROBA_TOLERANCE`` of 1), else the softmax of the row (the
  scores are taken as logits). Softmax keeps the order, so the prediction is the same;
- classification, a row that is a single number: for a two-class model with a float
  output, the score of the second class — a probability when in [0, 1], else a logit
  (``proba`` = its sigmoid) — so ``prediction`` is 1 when that probability is at least 0.5
  and ``proba`` is ``[1 - p, p]``; otherwise (a model that outputs class indices) the
  number itself is the class index, with no ``proba``;
- regression and other tasks → the row's values: a number for a scalar row, else a (nested)
  list shaped like the row; no ``proba``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from torchops.types import Array, Signature

__all__ = ["PROBA_TOLERANCE", "RowRule"]

#: how far from 1 the sum of a row may be for it to count as probabilities already
PROBA_TOLERANCE = 1e-3
#: rows with more class scores than this are handled with numpy instead of Python lists
_PYTHON_MAX = 64


class RowRule:
    """Turns one row of a version's first output into ``(prediction, proba)``."""

    __slots__ = ("binary", "classifier", "fixed", "input_values", "output", "trusted")

    def __init__(self, signature: Signature, *, trusted: bool = False) -> None:
        #: set by the server's monitor: batches made with this rule come from a batcher of
        #: this signature (valid model name, ids and arrays), so the writer skips checks
        self.trusted = trusted
        #: no variable dimension past the batch one: all batches of the signature stack
        self.fixed = all(
            all(d >= 0 for d in spec.shape[1:]) for spec in (*signature.inputs, *signature.outputs)
        )
        first = signature.outputs[0] if signature.outputs else None
        self.output = first.name if first is not None else None
        self.classifier = signature.task == "classification"
        n_classes = len(signature.labels) if signature.labels else 0
        self.binary = (
            self.classifier
            and first is not None
            and n_classes == 2
            and np.dtype(first.dtype).kind == "f"
        )
        # values per row of all inputs (-1 dims count as large): decides input sampling
        total = 0
        for spec in signature.inputs:
            size = 1
            for d in spec.shape[1:]:
                size *= d if d > 0 else 1_000_000
            total += size
        self.input_values = total

    def predict(self, row: Array) -> tuple[Any, list[float] | None]:
        """``(prediction, proba)`` of one row (see the module doc)."""
        if not self.classifier:
            return row.tolist(), None
        if row.ndim == 0 or row.size == 1:
            value = row.reshape(-1)[0]
            if not self.binary:
                return int(value), None
            p = float(value)
            if not 0.0 <= p <= 1.0:
                p = 1.0 / (1.0 + math.exp(-p)) if p > -700 else 0.0
            return int(p >= 0.5), [1.0 - p, p]
        if row.size > _PYTHON_MAX:
            return _classify_numpy(row.reshape(-1))
        values: list[float] = row.reshape(-1).tolist()
        top = max(values)
        index = values.index(top)
        total = 0.0
        for v in values:
            if not 0.0 <= v <= 1.0:
                break
            total += v
        else:
            if abs(total - 1.0) <= PROBA_TOLERANCE:
                return index, [float(v) for v in values]
        exps = [math.exp(v - top) for v in values]
        scale = 1.0 / sum(exps)
        return index, [e * scale for e in exps]

    def classes_many(self, first: Array) -> Array | None:
        """The class index of every row (as ``predict_many``, without probabilities);
        None for a model that is not a classifier."""
        if not self.classifier:
            return None
        n = first.shape[0]
        if first.ndim == 1 or first[0].size == 1:
            return self.predict_many(first)[0]
        classes: Array = first.reshape(n, -1).argmax(axis=1)
        return classes

    def predict_many(self, first: Array) -> tuple[Array | None, Array | None]:
        """``(classes, proba)`` of every row of the first output at once, by the same rule
        as ``predict``: int64 class indices and float64 probabilities (None when the rule
        gives none); ``(None, None)`` when the predictions are the rows themselves."""
        if not self.classifier:
            return None, None
        n = first.shape[0]
        if first.ndim == 1 or first[0].size == 1:
            values = first.reshape(n)
            if not self.binary:
                return values.astype(np.int64), None
            p = values.astype(np.float64)
            outside = (p < 0.0) | (p > 1.0)
            if outside.any():
                with np.errstate(over="ignore"):
                    p = np.where(outside, 1.0 / (1.0 + np.exp(-p)), p)
            return (p >= 0.5).astype(np.int64), np.stack([1.0 - p, p], axis=1)
        scores = first.reshape(n, -1).astype(np.float64)
        classes = scores.argmax(axis=1)
        already = (
            (scores >= 0.0).all(axis=1)
            & (scores <= 1.0).all(axis=1)
            & (np.abs(scores.sum(axis=1) - 1.0) <= PROBA_TOLERANCE)
        )
        exps = np.exp(scores - scores.max(axis=1, keepdims=True))
        proba = np.where(already[:, None], scores, exps / exps.sum(axis=1, keepdims=True))
        return classes.astype(np.int64), proba


def _classify_numpy(row: Array) -> tuple[int, list[float]]:
    values = row.astype(np.float64)
    index = int(values.argmax())
    if values.min() >= 0.0 and values.max() <= 1.0 and abs(values.sum() - 1.0) <= PROBA_TOLERANCE:
        return index, values.tolist()
    exps = np.exp(values - values[index])
    result: list[float] = (exps / exps.sum()).tolist()
    return index, result
