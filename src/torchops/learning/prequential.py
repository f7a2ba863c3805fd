"""Prequential (test-then-train) evaluation of the serving model.

Each label is scored against the prediction the serving model made for it *before*
the label is used to train anything, so the score is an honest out-of-sample measure
of the model as it evolves. ``t`` counts labels: the i-th label scored has ``t = i``
(starting at 1).
"""

from __future__ import annotations

import math
from array import array

import numpy as np

from torchops.errors import InvalidInput
from torchops.learning.gate import _paired, row_losses
from torchops.types import Array, Task

__all__ = ["Prequential"]


class Prequential:
    """Running test-then-train scores: accuracy for classifiers, RMSE for regressors.

    ``window`` is the number of labels per point of ``curve()``.
    """

    def __init__(self, *, task: Task = "classification", window: int = 100) -> None:
        if task not in ("classification", "regression"):
            raise InvalidInput(f"prequential scores classification or regression, not {task!r}")
        if window < 1:
            raise InvalidInput(f"window must be at least 1, got {window}")
        self.task: Task = task
        self.window = window
        # per label: 1.0/0.0 correctness, or the squared error
        self._values = array("d")

    def update(self, y_true: Array, y_pred: Array) -> None:
        """Score a batch of labels against the predictions served for them."""
        truth, pred = _paired(self.task, np.atleast_1d(y_true), np.atleast_1d(y_pred), "labels")
        if self.task == "classification":
            self._values.extend((truth == pred).astype(np.float64).tolist())
        else:
            self._values.extend(row_losses(truth, pred).tolist())

    @property
    def n(self) -> int:
        """Labels scored so far."""
        return len(self._values)

    def _metric(self, values: Array) -> float:
        if values.size == 0:
            return math.nan
        mean = float(values.mean())
        return mean if self.task == "classification" else math.sqrt(mean)

    @property
    def value(self) -> float:
        """The score over every label so far (NaN before the first)."""
        return self._metric(np.frombuffer(self._values, dtype=np.float64))

    def between(self, start: int, end: int | None = None) -> float:
        """The score over labels ``start < t <= end`` (``end`` defaults to the last)."""
        values = np.frombuffer(self._values, dtype=np.float64)
        return self._metric(values[max(start, 0) : end])

    def after(self, t0: int, within: int | None = None) -> float:
        """The score over labels after ``t0`` (and at most ``within`` of them)."""
        return self.between(t0, None if within is None else t0 + within)

    def curve(self) -> list[tuple[int, float]]:
        """``(t, score)`` per complete window of ``window`` labels, ``t`` its last label."""
        values = np.frombuffer(self._values, dtype=np.float64)
        points = []
        for end in range(self.window, len(values) + 1, self.window):
            points.append((end, self._metric(values[end - self.window : end])))
        return points

    def __repr__(self) -> str:
        return f"Prequential(task={self.task!r}, window={self.window}, n={self.n})"
