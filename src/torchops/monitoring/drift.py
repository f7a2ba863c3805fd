"""Drift of live inputs and predictions against a version's reference profile.

A ``DriftWindow`` takes live feature rows (``torchops.monitoring.features.extract``) and
per-row predictions, adds their counts in the profile's fixed bins (counts merge by
addition, so a window grows on a stream) and keeps the last ``max_rows`` raw rows (default
5000) for small-window tests. ``report`` scores it; the defaults (``DriftConfig``) are
those Evidently users know:

- fewer than ``min_rows`` (30) rows → no verdict (no features in the report);
- a *large* window (``large_window`` = 1000 rows or more) → per feature, the population
  stability index and the Jensen-Shannon distance between the reference shares and the
  window's shares over the same bins; the feature drifts when PSI ≥ ``psi_threshold``
  (0.2) or JS ≥ ``js_threshold`` (0.1) (method ``"psi"``);
- a *small* window → per feature, the two-sample Kolmogorov-Smirnov test of the window's
  rows against the profile's reference sample (``scipy.stats.ks_2samp``); the feature
  drifts when p < ``p_threshold`` (0.05) (method ``"ks"``). PSI and JS are still reported;
- the dataset drifts when at least ``share`` (0.5) of its features drift;
- predictions likewise: PSI/JS over the predicted classes (or output bins) for large
  windows, and for small ones a chi-square test of homogeneity between the reference
  counts and the window's counts (``scipy.stats.chi2_contingency``, method ``"chi2"``).

PSI is ``sum((q - p) * ln(q / p))`` over bins, reference share ``p`` and live share ``q``,
with an empty bin's share replaced by ``EPSILON`` (1e-4) in either distribution, as
Evidently does. JS is the Jensen-Shannon *distance* (the square root of the divergence,
base 2), so it lies in [0, 1]. A feature constant in the reference and at the same value
live has identical shares (PSI 0, JS 0, KS p = 1): it never drifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency, ks_2samp

from torchops.errors import InvalidInput
from torchops.monitoring.profiles import Profile, bin_counts, padded_edges, prediction_counts
from torchops.types import Array

__all__ = [
    "EPSILON",
    "DriftConfig",
    "DriftReport",
    "DriftWindow",
    "FeatureDrift",
    "js_distance",
    "psi",
]

#: share given to an empty bin when computing PSI
EPSILON = 1e-4


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """Thresholds and window rules for drift verdicts (see the module doc)."""

    psi_threshold: float = 0.2
    js_threshold: float = 0.1
    p_threshold: float = 0.05
    large_window: int = 1000
    share: float = 0.5
    min_rows: int = 30

    def __post_init__(self) -> None:
        for name in ("psi_threshold", "js_threshold", "p_threshold", "share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidInput(f"DriftConfig.{name} must be a number ≥ 0, got {value!r}")
        for name in ("large_window", "min_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"DriftConfig.{name} must be an integer ≥ 1, got {value!r}")
        if self.p_threshold > 1 or self.share > 1:
            raise InvalidInput("DriftConfig.p_threshold and share must be at most 1")


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """One feature's (or the prediction's) drift scores and verdict."""

    name: str
    psi: float
    js: float
    p_value: float | None
    method: str
    drifted: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "psi": self.psi,
            "js": self.js,
            "p_value": self.p_value,
            "method": self.method,
            "drifted": self.drifted,
        }


@dataclass(frozen=True, slots=True)
class DriftReport:
    """A window's drift: per feature, the share that drifted, the dataset verdict."""

    rows: int
    features: tuple[FeatureDrift, ...]
    drifted_share: float
    dataset_drifted: bool
    prediction: FeatureDrift | None

    @property
    def drifted_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.drifted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "drifted_share": self.drifted_share,
            "dataset_drifted": self.dataset_drifted,
            "features": [f.to_dict() for f in self.features],
            "prediction": self.prediction.to_dict() if self.prediction is not None else None,
        }


def psi(reference: Array, live: Array) -> float:
    """Population stability index between two count (or share) vectors over the same bins."""
    return float(_psi(reference, live))


def js_distance(reference: Array, live: Array) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count or share vectors."""
    return float(_js(reference, live))


def _psi(reference: Array, live: Array) -> Array:
    """``psi`` along the last axis (of ``[features, bins]`` counts: one per feature)."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(live, dtype=np.float64)
    p = np.maximum(p / p.sum(axis=-1, keepdims=True), 0.0)
    q = np.maximum(q / q.sum(axis=-1, keepdims=True), 0.0)
    p = np.where(p == 0, EPSILON, p)
    q = np.where(q == 0, EPSILON, q)
    scores: Array = np.sum((q - p) * np.log(q / p), axis=-1)
    return scores


def _js(reference: Array, live: Array) -> Array:
    """``js_distance`` along the last axis (NaN, from an all-zero vector, counts as 0)."""
    value = jensenshannon(np.asarray(reference, float), np.asarray(live, float), base=2, axis=-1)
    distances: Array = np.clip(np.nan_to_num(value, nan=0.0), 0.0, 1.0)
    return distances


def _chi2_p(reference: Array, live: Array) -> float:
    table = np.stack([np.asarray(reference, float), np.asarray(live, float)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table).pvalue)


class DriftWindow:
    """Live rows binned against ``profile``; ``report`` scores them (see the module doc)."""

    def __init__(self, profile: Profile, *, max_rows: int = 5000) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise InvalidInput(f"max_rows must be an integer ≥ 1, got {max_rows!r}")
        self.profile = profile
        self.max_rows = max_rows
        self._edges = padded_edges(profile)
        n_features, width = len(profile.features), self._edges.shape[1] + 1
        self._reference = np.zeros((n_features, width))
        for i, feature in enumerate(profile.features):
            self._reference[i, : len(feature.edges) + 1] = feature.proportions
        self._samples = [np.asarray(f.sample, dtype=np.float64) for f in profile.features]
        self._ring = np.empty((max_rows, n_features))
        self.reset()

    def reset(self) -> None:
        """Forget every row and prediction added so far."""
        self._counts = np.zeros_like(self._reference, dtype=np.int64)
        self._rows = 0
        self._filled = 0
        self._next = 0
        size = len(self.profile.prediction) if self.profile.prediction is not None else 0
        self._predicted = np.zeros(size, dtype=np.int64)
        self._prediction_rows = 0

    @property
    def rows(self) -> int:
        """Feature rows added since the last reset."""
        return self._rows

    @property
    def prediction_rows(self) -> int:
        return self._prediction_rows

    @property
    def counts(self) -> Array:
        """``[n_features, n_bins]`` counts so far (a copy)."""
        return self._counts.copy()

    def add(self, matrix: Array | None, predictions: Array | None = None) -> None:
        """Add feature rows (``extract`` output) and/or per-row predictions.

        ``predictions`` are class indices (or per-class scores, reduced by argmax) for
        classifiers, else values (rows of several values reduced to their mean). They
        are ignored when the profile has no prediction distribution. Either may be None
        (e.g. when the inputs of a request were not sampled).
        """
        counts = None
        if matrix is not None:
            matrix = np.asarray(matrix, dtype=np.float64)
            counts = bin_counts(self.profile, matrix, edges=self._edges)
        predicted = None
        if predictions is not None and self.profile.prediction is not None:
            predicted = prediction_counts(self.profile, predictions)
            n_pred = len(np.asarray(predictions))
            if matrix is not None and n_pred != matrix.shape[0]:
                raise InvalidInput(
                    f"{n_pred} predictions for {matrix.shape[0]} rows: give one per row"
                )
        if matrix is not None and counts is not None:
            self._counts += counts
            self._rows += matrix.shape[0]
            self._remember(matrix)
        if predicted is not None and predictions is not None:
            self._predicted += predicted
            self._prediction_rows += len(np.asarray(predictions))

    def _remember(self, matrix: Array) -> None:
        n = matrix.shape[0]
        if n >= self.max_rows:
            self._ring[:] = matrix[n - self.max_rows :]
            self._next, self._filled = 0, self.max_rows
            return
        end = self._next + n
        if end <= self.max_rows:
            self._ring[self._next : end] = matrix
        else:
            split = self.max_rows - self._next
            self._ring[self._next :] = matrix[:split]
            self._ring[: n - split] = matrix[split:]
        self._next = end % self.max_rows
        self._filled = min(self._filled + n, self.max_rows)

    def _features(self, config: DriftConfig) -> tuple[FeatureDrift, ...]:
        """Every feature's scores and verdict. PSI and JS are computed for all features in
        one pass over the ``[features, bins]`` counts (padding bins are empty in both
        distributions: they add nothing), the KS tests in one call when they line up."""
        seen = self._counts.sum(axis=1) > 0  # a feature with no rows scores 0
        scores, distances = np.zeros(seen.size), np.zeros(seen.size)
        scores[seen] = _psi(self._reference[seen], self._counts[seen])
        distances[seen] = _js(self._reference[seen], self._counts[seen])
        large = self._rows >= config.large_window
        p_values = {} if large else self._p_values(np.flatnonzero(seen).tolist())
        features = []
        for i, feature in enumerate(self.profile.features):
            name, score, distance = feature.name, float(scores[i]), float(distances[i])
            if not seen[i]:
                features.append(FeatureDrift(name, 0.0, 0.0, None, "psi", False))
            elif large:
                drifted = score >= config.psi_threshold or distance >= config.js_threshold
                features.append(FeatureDrift(name, score, distance, None, "psi", drifted))
            else:
                p = p_values.get(i)
                drifted = p is not None and p < config.p_threshold
                features.append(FeatureDrift(name, score, distance, p, "ks", drifted))
        return tuple(features)

    def _p_values(self, columns: list[int]) -> dict[int, float]:
        """KS p-values of the remembered rows of ``columns`` against each one's reference
        sample (none for a column without finite rows). When no row has a NaN and the
        samples are of one size, one ``ks_2samp`` call tests every column: the same
        p-values, without scipy's per-call overhead (64 calls took about 12 ms)."""
        rows = self._ring[: self._filled]
        samples = [self._samples[i] for i in columns]
        if (
            columns
            and rows.shape[0]
            and len({s.size for s in samples}) == 1
            and samples[0].size
            and np.isfinite(rows[:, columns]).all()
        ):
            result = ks_2samp(rows[:, columns], np.stack(samples, axis=1), axis=0)
            return dict(zip(columns, np.atleast_1d(result.pvalue).tolist(), strict=True))
        p_values: dict[int, float] = {}
        for i, sample in zip(columns, samples, strict=True):
            values = rows[:, i]
            values = values[np.isfinite(values)]
            if values.size and sample.size:
                p_values[i] = float(ks_2samp(values, sample).pvalue)
        return p_values

    def _prediction(self, config: DriftConfig) -> FeatureDrift | None:
        if self.profile.prediction is None or self._prediction_rows < config.min_rows:
            return None
        reference = np.asarray(self.profile.prediction) * self.profile.n_reference
        live = self._predicted
        if live.sum() == 0:
            return None
        score, distance = psi(reference, live), js_distance(reference, live)
        if self._prediction_rows >= config.large_window:
            drifted = score >= config.psi_threshold or distance >= config.js_threshold
            return FeatureDrift("prediction", score, distance, None, "psi", drifted)
        p_value = _chi2_p(np.rint(reference), live)
        return FeatureDrift(
            "prediction", score, distance, p_value, "chi2", p_value < config.p_threshold
        )

    def report(self, config: DriftConfig | None = None) -> DriftReport:
        """Score the window against the profile (``DriftConfig()`` defaults)."""
        config = DriftConfig() if config is None else config
        features: tuple[FeatureDrift, ...] = ()
        if self._rows >= config.min_rows:
            features = self._features(config)
        drifted = sum(f.drifted for f in features)
        share = drifted / len(features) if features else 0.0
        return DriftReport(
            rows=self._rows,
            features=features,
            drifted_share=share,
            dataset_drifted=bool(features) and share >= config.share,
            prediction=self._prediction(config),
        )
