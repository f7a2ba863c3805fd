"""The live state of one model version: quality windows, tumbling drift windows, histograms.

``LiveVersion`` is fed by the monitor's thread: labelled observations (read back from the
store with their feedback) go into three quality trackers — cumulative, the last
``quality_window`` labelled rows and the last ``quality_window_seconds`` seconds of
predictions — plus any other row window an alert rule asks for (filled from the recent
rows kept in memory when it is first asked for). Newly written observations go into a
``DriftWindow`` against the version's reference profile; the window is *tumbling*: once
it holds ``drift_window`` observations it becomes the latest full window and a new one
starts empty. A window keeps its feature rows and predictions raw; it is binned and scored
(``DriftWindow``) when its verdict is first asked for — the monitor publishes every few
seconds — not when it fills: under heavy traffic windows fill many times a second, and
scoring one (a KS test per feature) costs far more than filling it. Rows whose inputs
were not sampled count as NaN features (ignored by binning and the tests).
Not thread-safe: the monitor holds its lock.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from torchops.errors import TorchopsError
from torchops.monitoring._batches import Batch, Observation
from torchops.monitoring.drift import DriftConfig, DriftReport, DriftWindow
from torchops.monitoring.features import extract
from torchops.monitoring.profiles import Profile
from torchops.monitoring.quality import ClassificationQuality, RegressionQuality, make_quality
from torchops.types import Array, Signature

__all__ = ["LiveVersion"]

log = logging.getLogger("torchops.monitoring")

Quality = ClassificationQuality | RegressionQuality
#: labelled rows kept in memory to fill a new row window (an alert rule's) when it appears
HISTORY_ROWS = 20_000
#: rows of inputs and outputs kept between two TensorBoard histograms
HISTOGRAM_ROWS = 1000


@dataclass(frozen=True, slots=True)
class _Labelled:
    """Labelled rows ready for a quality tracker (``proba`` only for classifiers)."""

    y_true: Array
    y_pred: Array
    proba: Array | None
    at: Array

    def __len__(self) -> int:
        return int(self.at.shape[0])

    def tail(self, n: int) -> _Labelled:
        return _Labelled(
            self.y_true[-n:],
            self.y_pred[-n:],
            None if self.proba is None else self.proba[-n:],
            self.at[-n:],
        )


class LiveVersion:
    """Quality and drift of one version on live traffic (see the module doc)."""

    def __init__(
        self,
        model: str,
        version: int,
        signature: Signature,
        profile: Profile | None,
        *,
        quality_window: int,
        quality_window_seconds: float,
        drift_window: int,
        drift_config: DriftConfig,
    ) -> None:
        self.model = model
        self.version = version
        self.signature = signature
        self.profile = profile
        self.quality_window = quality_window
        self.quality_window_seconds = quality_window_seconds
        self.drift_window = drift_window
        self.drift_config = drift_config
        self.classifier = signature.task == "classification"
        self.cumulative = make_quality(signature)
        self.last_n = make_quality(signature, window=quality_window)
        self.last_t = make_quality(signature, window_seconds=quality_window_seconds)
        self.n_classes = (
            self.cumulative.n_classes if isinstance(self.cumulative, ClassificationQuality) else 0
        )
        self._windows: dict[int, Quality] = {quality_window: self.last_n}
        self._history: deque[_Labelled] = deque()
        self._history_rows = 0
        #: the drift window filling up, and the last full one
        width = len(profile.features) if profile is not None else 0
        self.drift = _RawWindow(drift_window, width) if profile is not None else None
        self.full: _RawWindow | None = None
        self._report: DriftReport | None = None
        #: drift windows filled so far
        self.filled = 0
        self._recent: deque[tuple[Array | None, Array | None, int]] = deque()
        self._recent_rows = 0
        #: set when new rows arrived since the monitor last published this version
        self.changed = False
        self.drift_changed = False
        self.step = 0
        self._warned: set[str] = set()

    # -- quality -------------------------------------------------------------------------

    def add_labelled(self, observations: Sequence[Observation]) -> int:
        """Add observations that carry their label; returns how many rows were usable."""
        batches = self._labelled(observations)
        for batch in batches:
            for tracker in (self.cumulative, self.last_t, *self._windows.values()):
                _update(tracker, batch)
            self._remember(batch)
        added = sum(len(b) for b in batches)
        if added:
            self.changed = True
        return added

    def window(self, rows: int | None = None) -> Quality:
        """The tracker of the last ``rows`` labelled rows (default ``quality_window``),
        created on first use and filled from the rows kept in memory."""
        size = self.quality_window if rows is None else rows
        tracker = self._windows.get(size)
        if tracker is None:
            tracker = make_quality(self.signature, window=size)
            kept, wanted = [], size
            for batch in reversed(self._history):
                if wanted <= 0:
                    break
                kept.append(batch.tail(wanted) if len(batch) > wanted else batch)
                wanted -= len(batch)
            for batch in reversed(kept):
                _update(tracker, batch)
            self._windows[size] = tracker
        return tracker

    def windows(self) -> dict[str, dict[str, Any]]:
        """The metrics of the three standard windows (with the confusion matrix)."""
        result: dict[str, dict[str, Any]] = {}
        for name, tracker in (
            ("cumulative", self.cumulative),
            ("last_n", self.last_n),
            ("last_t", self.last_t),
        ):
            values: dict[str, Any] = dict(tracker.metrics())
            if isinstance(tracker, ClassificationQuality):
                values["confusion"] = tracker.confusion().tolist()
            result[name] = values
        return result

    def _remember(self, batch: _Labelled) -> None:
        self._history.append(batch)
        self._history_rows += len(batch)
        limit = max(HISTORY_ROWS, max(self._windows))
        while self._history and self._history_rows - len(self._history[0]) >= limit:
            self._history_rows -= len(self._history.popleft())

    def _labelled(self, observations: Sequence[Observation]) -> list[_Labelled]:
        if self.classifier:
            return self._classified(observations)
        return self._regressed(observations)

    def _classified(self, observations: Sequence[Observation]) -> list[_Labelled]:
        k = self.n_classes
        with_p: list[Observation] = []
        without_p: list[Observation] = []
        for obs in observations:
            if not (_class(obs.label, k) and _class(obs.prediction, k)):
                self._warn(
                    "class",
                    f"{self.model} v{self.version}: skipping rows whose label "
                    "or prediction is not a class index in range",
                )
                continue
            proba = obs.proba
            if isinstance(proba, list) and len(proba) == k and None not in proba:
                with_p.append(obs)
            else:
                without_p.append(obs)
        batches = []
        for group, has_p in ((with_p, True), (without_p, False)):
            if not group:
                continue
            scores: Array | None = None
            if has_p:
                scores = np.clip(np.asarray([o.proba for o in group], np.float64), 0.0, 1.0)
            batches.append(
                _Labelled(
                    np.fromiter((o.label for o in group), np.int64, len(group)),
                    np.fromiter((o.prediction for o in group), np.int64, len(group)),
                    scores,
                    _times(group),
                )
            )
        return batches

    def _regressed(self, observations: Sequence[Observation]) -> list[_Labelled]:
        groups: dict[int, tuple[list[Array], list[Array], list[Observation]]] = {}
        for obs in observations:
            try:
                truth = np.asarray(obs.label, dtype=np.float64).reshape(-1)
                predicted = np.asarray(obs.prediction, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                truth = predicted = np.empty(0)
            if truth.size == 0 or truth.size != predicted.size:
                self._warn(
                    "shape",
                    f"{self.model} v{self.version}: skipping rows whose target "
                    "and prediction differ in size",
                )
                continue
            group = groups.setdefault(truth.size, ([], [], []))
            group[0].append(truth)
            group[1].append(predicted)
            group[2].append(obs)
        return [_Labelled(np.stack(t), np.stack(p), None, _times(o)) for t, p, o in groups.values()]

    # -- drift and histograms ------------------------------------------------------------

    def add_written(self, batches: Sequence[Batch]) -> None:
        """Add newly written observations to the drift window and the histogram buffers."""
        for batch in batches:
            if batch.version == self.version and batch.rows:
                self._add_batch(batch)

    def _add_batch(self, batch: Batch) -> None:
        self._remember_arrays(batch)
        if self.drift is None:
            return
        n, size = batch.rows, self.drift_window
        # windows that fill and are followed by another full one within this batch are
        # never scored (only the latest full window is): count them, skip their rows
        completed = (self.drift.rows + n) // size
        start = 0
        if completed >= 2:
            start = completed * size - self.drift.rows - size
            self.filled += completed - 1
            self.drift.rows = 0  # its rows belonged to a skipped window
        predictions = batch.prediction_numbers()
        matrix: Array | None = None
        keep = batch.input_rows
        if batch.inputs is not None:
            inputs = batch.inputs
            if keep is None:
                inputs = {k: v[start:] for k, v in inputs.items()}
            else:
                first = int(np.searchsorted(keep, start))
                inputs = {k: v[first:] for k, v in inputs.items()}
                keep = keep[first:]
            try:  # feature rows from ``start`` on: matrix row i is batch row start + i
                matrix = extract(self.signature, inputs)
            except (TorchopsError, ValueError) as exc:
                self._warn("drift", f"{self.model} v{self.version}: drift skipped inputs: {exc}")
        base = start
        while start < n:
            window = self.drift
            end = start + min(n - start, self.drift_window - window.rows)
            part: Array | None = None
            part_keep: Array | None = None
            if matrix is not None:
                if keep is None:
                    part = matrix[start - base : end - base]
                else:
                    chosen = (keep >= start) & (keep < end)
                    part, part_keep = matrix[chosen], keep[chosen] - start
            window.add(part, part_keep, predictions[start:end], end - start)
            start = end
            if window.rows >= self.drift_window:
                spare = self.full or _RawWindow(self.drift_window, window.features.shape[1])
                spare.rows = 0
                self.full, self.drift = window, spare
                self._report = None
                self.filled += 1
                self.drift_changed = True

    def _remember_arrays(self, batch: Batch) -> None:
        """Keep the newest ``HISTOGRAM_ROWS`` rows of inputs and first outputs."""
        first = self.signature.outputs[0].name if self.signature.outputs else None
        output = batch.outputs.get(first) if first is not None else None
        inputs = None
        if batch.inputs is not None:
            inputs = [np.ravel(a[-HISTOGRAM_ROWS:]) for a in batch.inputs.values()]
        self._recent.append(
            (
                np.concatenate(inputs) if inputs else None,
                None if output is None else np.ravel(output[-HISTOGRAM_ROWS:]),
                min(batch.rows, HISTOGRAM_ROWS),
            )
        )
        self._recent_rows += self._recent[-1][2]
        while self._recent_rows - self._recent[0][2] >= HISTOGRAM_ROWS:
            self._recent_rows -= self._recent.popleft()[2]

    def drift_report(self) -> DriftReport | None:
        """The last full window's report, else the partial window's (None without a profile)."""
        if self.drift is None or self.profile is None:
            return None
        if self.full is None:
            return self.drift.score(self.profile, self.drift_config)
        if self._report is None:
            self._report = self.full.score(self.profile, self.drift_config)
        return self._report

    def take_histograms(self) -> tuple[Array | None, Array | None]:
        """The input and output values of about the last ``HISTOGRAM_ROWS`` observations
        written since the last call (flattened)."""
        recent = list(self._recent)
        self._recent.clear()
        self._recent_rows = 0
        inputs = [i for i, _, _ in recent if i is not None]
        outputs = [o for _, o, _ in recent if o is not None]
        return (
            np.concatenate(inputs) if inputs else None,
            np.concatenate(outputs) if outputs else None,
        )

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _update(tracker: Quality, batch: _Labelled) -> None:
    if isinstance(tracker, ClassificationQuality):
        tracker.update(batch.y_true, batch.y_pred, batch.proba, at=batch.at)
    else:
        tracker.update(batch.y_true, batch.y_pred, at=batch.at)


def _class(value: Any, n_classes: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_classes


def _times(observations: Sequence[Observation]) -> Array:
    return np.fromiter((o.at.timestamp() for o in observations), np.float64, len(observations))


class _RawWindow:
    """One drift window's feature rows and predictions, scored on demand."""

    def __init__(self, size: int, width: int) -> None:
        self.features = np.full((size, width), np.nan)
        self.predictions = np.full(size, np.nan)
        self.rows = 0

    def add(self, matrix: Array | None, keep: Array | None, predictions: Array, n: int) -> None:
        """Append ``n`` rows: features (of the rows ``keep``, default all) and predictions."""
        start, end = self.rows, self.rows + n
        block = self.features[start:end]
        if matrix is not None and matrix.shape[1] == block.shape[1]:
            if keep is None:
                block[:] = matrix
            else:
                block[:] = np.nan
                block[keep] = matrix
        else:
            block[:] = np.nan
        self.predictions[start:end] = predictions
        self.rows = end

    def score(self, profile: Profile, config: DriftConfig) -> DriftReport:
        window = DriftWindow(profile, max_rows=max(self.rows, 1))
        features = self.features[: self.rows]
        sampled = features[~np.isnan(features).all(axis=1)] if features.shape[1] else features
        if sampled.shape[0]:
            window.add(sampled)
        predictions = self.predictions[: self.rows]
        predictions = predictions[~np.isnan(predictions)]
        if predictions.size and profile.prediction is not None:
            window.add(None, predictions)
        return window.report(config)
