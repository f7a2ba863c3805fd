"""Labelled rows a learner keeps in memory, and predictions of stored versions on them.

``LabelledRows`` holds accepted labelled rows in feedback order for as long as a pending
challenger (its held-out labels) or the rollback guard (its live window) needs them.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from torchops.errors import InvalidInput
from torchops.runtime import Runtime
from torchops.types import Array, Signature, Task

__all__ = ["LabelledRows", "ServedQuality", "predictions", "row_inputs", "softmax", "targets"]


class LabelledRows:
    """Rows in feedback order: feedback id, served version and prediction, label, inputs."""

    def __init__(self) -> None:
        self.fids: list[int] = []
        self.versions: list[int] = []
        self.served: list[Any] = []
        self.labels: list[Any] = []
        self.inputs: list[dict[str, Array]] = []

    def __len__(self) -> int:
        return len(self.fids)

    def append(
        self, fid: int, version: int, served: Any, label: Any, inputs: dict[str, Array]
    ) -> None:
        if self.fids and fid <= self.fids[-1]:
            return  # already held (a replayed row)
        self.fids.append(fid)
        self.versions.append(version)
        self.served.append(served)
        self.labels.append(label)
        self.inputs.append(inputs)

    def after(self, fid: int, *, version: int | None = None) -> list[int]:
        """Positions of the rows whose feedback id is above ``fid`` (served by ``version``)."""
        start = bisect.bisect_right(self.fids, fid)
        positions = range(start, len(self.fids))
        if version is None:
            return list(positions)
        return [i for i in positions if self.versions[i] == version]

    def count_after(self, fid: int) -> int:
        return len(self.fids) - bisect.bisect_right(self.fids, fid)

    def stack(self, positions: Sequence[int]) -> dict[str, Array]:
        """The inputs of ``positions`` as one batch."""
        names = self.inputs[positions[0]].keys()
        return {n: np.concatenate([self.inputs[i][n] for i in positions]) for n in names}

    def trim(self, keep_after: int) -> None:
        """Forget rows with feedback id at or below ``keep_after``."""
        cut = bisect.bisect_right(self.fids, keep_after)
        if cut:
            for column in (self.fids, self.versions, self.served, self.labels, self.inputs):
                del column[:cut]


def row_inputs(signature: Signature, inputs: Mapping[str, Array] | None) -> dict[str, Array] | None:
    """One observation's inputs as a batch of one row per input, or None if unusable."""
    if not inputs:
        return None
    rows: dict[str, Array] = {}
    for spec in signature.inputs:
        array = inputs.get(spec.name)
        if array is None and len(signature.inputs) == 1 and len(inputs) == 1:
            array = next(iter(inputs.values()))
        if array is None:
            return None
        array = np.asarray(array)
        if array.ndim == len(spec.shape) - 1:
            array = array[None]
        if array.ndim != len(spec.shape) or array.shape[0] != 1:
            return None
        rows[spec.name] = array
    return rows


def predictions(runtime: Runtime, inputs: Mapping[str, Array], task: Task) -> Array:
    """Class indices (classification) or the first output's values per row (regression)."""
    outputs = runtime.predict_batch(inputs)
    first = np.asarray(outputs[runtime.signature.outputs[0].name])
    if task == "classification":
        result: Array = first.argmax(axis=1)
        return result
    return _values(first)


def targets(task: Task, labels: Sequence[Any]) -> Array:
    """Labels as the gate compares them: class indices, or values shaped like predictions."""
    if task == "classification":
        return np.asarray([int(v) for v in labels], dtype=np.int64)
    return _values(np.asarray(labels, dtype=np.float64))


def _values(array: Array) -> Array:
    values = np.asarray(array, dtype=np.float64).reshape(len(array), -1)
    result: Array = values[:, 0] if values.shape[1] == 1 else values
    return result


def softmax(logits: Array) -> Array:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise InvalidInput(f"expected logits of shape [n, classes], got {list(z.shape)}")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: Array = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


class ServedQuality:
    """Prequential totals of what was served: overall and per served version.

    ``totals`` maps ``"all"`` and each version (as a string) to ``[labels, sum]``, the sum
    of correct answers (classification) or of squared errors (regression); it is plain
    JSON, so a learner stores it with its place.
    """

    def __init__(self, task: Task, totals: Mapping[str, Sequence[float]] | None = None) -> None:
        self.task: Task = task
        self.totals = {k: [float(v[0]), float(v[1])] for k, v in (totals or {}).items()}

    def add(self, version: int, truth: Array, served: Array) -> None:
        if self.task == "classification":
            value = float(np.sum(truth == served))
        else:
            value = float(np.sum((np.asarray(truth) - np.asarray(served)) ** 2))
        for key in ("all", str(version)):
            total = self.totals.setdefault(key, [0.0, 0.0])
            total[0] += len(truth)
            total[1] += value

    def _score(self, total: Sequence[float]) -> float:
        mean = total[1] / total[0] if total[0] else float("nan")
        return mean if self.task == "classification" else float(np.sqrt(mean))

    def summary(self) -> dict[str, Any]:
        metric = "accuracy" if self.task == "classification" else "rmse"
        everything = self.totals.get("all", [0.0, 0.0])
        return {
            "metric": metric,
            "labels": int(everything[0]),
            "value": self._score(everything),
            "by_version": {
                k: {"labels": int(v[0]), metric: self._score(v)}
                for k, v in self.totals.items()
                if k != "all"
            },
        }
