"""A monitoring report of one model version, read straight from the stores (no server).

``build_report`` gathers what ``torchops monitor`` shows:

- quality on the labelled predictions (observations joined with their feedback), in the
  order the predictions were made: cumulative, and over the last ``window`` labelled ones;
- trends: each key metric over time from the stored quality snapshots the server's
  monitor writes; when there are fewer than two, the recent-window metric recomputed
  as the labelled predictions accumulate (``trend_source`` says which);
- drift: the most recent ``drift_window`` observations whose inputs were stored, binned
  against the version's reference profile by a ``DriftWindow`` (features), and their
  predictions (prediction drift); the drift share over time from drift snapshots;
- alerts: the model's rules, the events still firing, and the most recent events.

``MonitorReport.to_dict`` is the JSON the CLI prints with ``--json``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine

from torchops.errors import InvalidInput, TorchopsError
from torchops.monitoring._batches import Batch
from torchops.monitoring.alerts import AlertEvent, AlertRule, AlertStore
from torchops.monitoring.drift import DriftConfig, DriftReport, DriftWindow
from torchops.monitoring.features import extract
from torchops.monitoring.observations import Observation, ObservationStore
from torchops.monitoring.profiles import Profile
from torchops.monitoring.quality import ClassificationQuality, RegressionQuality, make_quality
from torchops.monitoring.snapshots import Snapshot, SnapshotStore
from torchops.refs import ModelRef
from torchops.registry.store import utcnow
from torchops.types import Array, Signature

if TYPE_CHECKING:
    from torchops.registry import Registry

__all__ = [
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "MonitorReport",
    "QualityView",
    "TrendPoint",
    "build_report",
]

#: the metrics a report puts first, in this order
CLASSIFICATION_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "log_loss")
REGRESSION_METRICS = ("mse", "rmse", "mae")
#: labelled rows read per query
_PAGE = 5000
#: points of a trend recomputed from labelled predictions
_TREND_POINTS = 60


@dataclass(frozen=True, slots=True)
class TrendPoint:
    """One value of a metric at one time."""

    at: datetime
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "value": _finite(self.value)}


@dataclass(frozen=True, slots=True)
class QualityView:
    """Quality metrics over one window (``cumulative`` or ``last_<N>``) of labelled rows."""

    window: str
    metrics: dict[str, float]
    confusion: list[list[int]] | None = None

    @property
    def count(self) -> int:
        return int(self.metrics.get("count", 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            "confusion": self.confusion,
        }


@dataclass(frozen=True, slots=True)
class MonitorReport:
    """What is known about a model version's live behaviour (see the module doc)."""

    model: str
    version: int
    task: str
    labels: tuple[str, ...] | None
    generated_at: datetime
    observations: int
    labelled: int
    window: int
    quality: tuple[QualityView, ...]
    trends: dict[str, list[TrendPoint]] = field(default_factory=dict)
    trend_source: str = "none"
    drift: DriftReport | None = None
    drift_note: str | None = None
    drift_trend: list[TrendPoint] = field(default_factory=list)
    rules: tuple[AlertRule, ...] = ()
    active: tuple[AlertEvent, ...] = ()
    events: tuple[AlertEvent, ...] = ()

    @property
    def key_metrics(self) -> tuple[str, ...]:
        """The headline metrics of the task, in display order."""
        return CLASSIFICATION_METRICS if self.task == "classification" else REGRESSION_METRICS

    @property
    def cumulative(self) -> QualityView:
        return self.quality[0]

    @property
    def recent(self) -> QualityView:
        return self.quality[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
            "generated_at": self.generated_at.isoformat(),
            "observations": self.observations,
            "labelled": self.labelled,
            "window": self.window,
            "quality": [q.to_dict() for q in self.quality],
            "trends": {k: [p.to_dict() for p in v] for k, v in self.trends.items()},
            "trend_source": self.trend_source,
            "drift": _finite_tree(self.drift.to_dict()) if self.drift is not None else None,
            "drift_note": self.drift_note,
            "drift_trend": [p.to_dict() for p in self.drift_trend],
            "rules": [r.to_dict() for r in self.rules],
            "active": [e.to_dict() for e in self.active],
            "events": [e.to_dict() for e in self.events],
        }


def build_report(
    registry: Registry,
    ref: str | ModelRef,
    *,
    window: int = 500,
    drift_window: int | None = None,
    drift_config: DriftConfig | None = None,
    events_limit: int = 20,
    history_limit: int = 1000,
) -> MonitorReport:
    """The report of the version ``ref`` resolves to (``digits`` → production, else latest).

    ``window``: labelled rows in the recent quality window; ``drift_window``: most recent
    observations scored for drift (default: ``window``).
    """
    for what, value in (("window", window), ("events_limit", events_limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{what} must be a positive number of rows, got {value!r}")
    drift_rows = window if drift_window is None else drift_window
    if isinstance(drift_rows, bool) or not isinstance(drift_rows, int) or drift_rows < 1:
        raise InvalidInput(f"drift_window must be a positive number of rows, got {drift_rows!r}")
    mv = registry.get(ref)
    engine = registry.engine
    observations = ObservationStore(engine, join_grace_s=0.0)
    signature = mv.signature
    labelled = _labelled(observations, mv.name, mv.version)
    cumulative, recent, computed = _quality(signature, labelled, window)
    trends, source = _snapshot_trends(engine, mv.name, mv.version, history_limit, signature)
    if not trends and computed:
        trends, source = computed, "labelled"
    profile = _profile(registry, mv.name, mv.version, "profile" in mv.artifacts)
    drift, note = _drift(engine, signature, profile, mv.name, mv.version, drift_rows, drift_config)
    alerts = AlertStore(engine)
    return MonitorReport(
        model=mv.name,
        version=mv.version,
        task=signature.task,
        labels=signature.labels,
        generated_at=utcnow(),
        observations=observations.count(mv.name, mv.version),
        labelled=len(labelled),
        window=window,
        quality=(cumulative, recent),
        trends=trends,
        trend_source=source,
        drift=drift,
        drift_note=note,
        drift_trend=_drift_trend(engine, mv.name, mv.version, history_limit),
        rules=tuple(alerts.rules(mv.name)),
        active=tuple(alerts.active(mv.name)),
        events=tuple(alerts.events(mv.name, limit=events_limit)),
    )


# -- quality ----------------------------------------------------------------------------


def _labelled(observations: ObservationStore, model: str, version: int) -> list[Observation]:
    """Every labelled prediction of the version, oldest prediction first."""
    rows: list[Observation] = []
    cursor = 0
    while True:
        page = observations.labelled(model, version, since_id=cursor, limit=_PAGE, arrays=False)
        rows.extend(page.observations)
        if page.cursor == cursor:
            break
        cursor = page.cursor
    rows.sort(key=lambda o: o.at)
    return rows


Quality = ClassificationQuality | RegressionQuality


def _quality(
    signature: Signature, rows: Sequence[Observation], window: int
) -> tuple[QualityView, QualityView, dict[str, list[TrendPoint]]]:
    """Cumulative and last-``window`` quality, and the recent metric as rows accumulate."""
    cumulative = make_quality(signature)
    recent = make_quality(signature, window=window)
    usable = [r for r in (_labelled_row(cumulative, o) for o in rows) if r is not None]
    metrics = CLASSIFICATION_METRICS if signature.task == "classification" else REGRESSION_METRICS
    trends: dict[str, list[TrendPoint]] = {m: [] for m in metrics}
    step = max(1, math.ceil(len(usable) / _TREND_POINTS))
    for start in range(0, len(usable), step):
        chunk = usable[start : start + step]
        _feed(cumulative, chunk)
        _feed(recent, chunk)
        values = recent.metrics(now=chunk[-1][0].timestamp())
        for metric in metrics:
            if metric in values:
                trends[metric].append(TrendPoint(chunk[-1][0], values[metric]))
    trends = {k: v for k, v in trends.items() if len(v) >= 2}
    return _view("cumulative", cumulative), _view(f"last_{window}", recent), trends


_Row = tuple[datetime, Any, Any, Any]


def _labelled_row(quality: Quality, obs: Observation) -> _Row | None:
    """``(at, target, prediction, proba)`` when they fit the tracker, else None."""
    if obs.label is None or obs.prediction is None:
        return None
    if isinstance(quality, ClassificationQuality):
        n = quality.n_classes
        target, predicted = _class(obs.label, n), _class(obs.prediction, n)
        if target is None or predicted is None:
            return None
        proba = obs.proba if isinstance(obs.proba, list) and len(obs.proba) == n else None
        if proba is not None and not all(isinstance(p, int | float) for p in proba):
            proba = None
        return obs.at, target, predicted, proba
    try:
        target_array = np.asarray(obs.label, dtype=np.float64).reshape(-1)
        predicted_array = np.asarray(obs.prediction, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if target_array.shape != predicted_array.shape or target_array.size == 0:
        return None
    if not (np.isfinite(target_array).all() and np.isfinite(predicted_array).all()):
        return None
    return obs.at, target_array, predicted_array, None


def _class(value: Any, n_classes: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not float(value).is_integer() or not 0 <= value < n_classes:
        return None
    return int(value)


def _feed(quality: Quality, rows: Sequence[_Row]) -> None:
    """Add rows in order; a classifier gets them in runs with and without probabilities."""
    if isinstance(quality, RegressionQuality):
        for width, run in _runs(rows, lambda r: int(r[1].size)):
            quality.update(
                np.stack([r[1] for r in run]).reshape(len(run), width),
                np.stack([r[2] for r in run]).reshape(len(run), width),
                at=np.array([r[0].timestamp() for r in run]),
            )
        return
    for has_proba, run in _runs(rows, lambda r: r[3] is not None):
        quality.update(
            np.array([r[1] for r in run], dtype=np.int64),
            np.array([r[2] for r in run], dtype=np.int64),
            proba=np.array([r[3] for r in run], dtype=np.float64) if has_proba else None,
            at=np.array([r[0].timestamp() for r in run]),
        )


def _runs(rows: Sequence[_Row], key: Any) -> Iterable[tuple[Any, list[_Row]]]:
    """Consecutive rows sharing ``key(row)``."""
    run: list[_Row] = []
    current: Any = None
    for row in rows:
        k = key(row)
        if run and k != current:
            yield current, run
            run = []
        current = k
        run.append(row)
    if run:
        yield current, run


def _view(window: str, quality: Quality) -> QualityView:
    confusion = None
    if isinstance(quality, ClassificationQuality):
        confusion = quality.confusion().tolist()
    # no wall-clock expiry: these are count windows
    return QualityView(window, quality.metrics(), confusion)


# -- snapshots --------------------------------------------------------------------------


def _window_rank(name: str) -> tuple[int, str]:
    """Which snapshot window a trend should follow: recent counts, then recent times."""
    if name == "last_n" or (name.startswith("last_") and name[5:].isdigit()):
        return 0, name
    if name.startswith("last"):
        return 1, name
    return 2, name


def _snapshot_trends(
    engine: Engine, model: str, version: int, limit: int, signature: Signature
) -> tuple[dict[str, list[TrendPoint]], str]:
    history = SnapshotStore(engine).history(model, version, "quality", limit)
    by_window: dict[str, list[Snapshot]] = {}
    for snap in history:
        by_window.setdefault(snap.window, []).append(snap)
    candidates = [w for w, snaps in by_window.items() if len(snaps) >= 2]
    if not candidates:
        return {}, "none"
    chosen = min(candidates, key=_window_rank)
    metrics = CLASSIFICATION_METRICS if signature.task == "classification" else REGRESSION_METRICS
    trends = {m: _series(by_window[chosen], m) for m in metrics}
    trends = {k: v for k, v in trends.items() if len(v) >= 2}
    return trends, (f"snapshots:{chosen}" if trends else "none")


def _series(snapshots: Iterable[Snapshot], key: str) -> list[TrendPoint]:
    points = []
    for snap in snapshots:
        value = snap.values.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            points.append(TrendPoint(snap.at, float(value)))
    return points


def _drift_trend(engine: Engine, model: str, version: int, limit: int) -> list[TrendPoint]:
    history = SnapshotStore(engine).history(model, version, "drift", limit)
    if not history:
        return []
    # one window's series (drift snapshots are usually written for a single window)
    counts: dict[str, int] = {}
    for snap in history:
        counts[snap.window] = counts.get(snap.window, 0) + 1
    chosen = max(counts, key=lambda w: counts[w])
    return _series((s for s in history if s.window == chosen), "drifted_share")


# -- drift ------------------------------------------------------------------------------


def _profile(registry: Registry, model: str, version: int, present: bool) -> Profile | None:
    if not present:
        return None
    return Profile.from_bytes(registry.read_artifact(f"{model}:{version}", "profile"))


def _drift(
    engine: Engine,
    signature: Signature,
    profile: Profile | None,
    model: str,
    version: int,
    rows: int,
    config: DriftConfig | None,
) -> tuple[DriftReport | None, str | None]:
    if profile is None:
        return None, (
            "this version has no reference profile: register it with a reference sample "
            "of training inputs to monitor drift"
        )
    batches = ObservationStore(engine).tail(model, version, rows)
    recent = sum(batch.rows for batch in batches)
    window = DriftWindow(profile, max_rows=rows)
    sampled, matrix = _features(signature, batches, rows)
    if matrix is not None:
        window.add(matrix)
    predictions = _predictions(profile, batches, rows)
    if predictions is not None:
        # predictions that do not fit the profile's distribution: no prediction drift
        with contextlib.suppress(InvalidInput, ValueError):
            window.add(None, predictions)
    report = window.report(config)
    if not recent:
        return report, "no predictions of this version are stored yet"
    if not sampled:
        return report, "no stored observation of this version has its inputs (input sampling?)"
    if matrix is None:
        names = ", ".join(spec.name for spec in signature.inputs)
        return report, f"the stored inputs do not fit the version's inputs ({names})"
    if not report.features:
        needed = (config or DriftConfig()).min_rows
        return report, f"{report.rows} rows with inputs: at least {needed} are needed for a verdict"
    return report, None


def _features(
    signature: Signature, batches: Sequence[Batch], rows: int
) -> tuple[int, Array | None]:
    """How many of the stored rows have inputs, and the feature matrix of the newest
    ``rows`` of them that fit the signature."""
    sampled = 0
    parts: list[Array] = []
    for batch in batches:
        if batch.inputs is None:
            continue
        sampled += len(next(iter(batch.inputs.values()), ()))
        try:
            parts.append(extract(signature, batch.inputs))
        except (TorchopsError, ValueError):
            continue  # inputs of another shape (a changed signature?) are left out
    if not parts:
        return sampled, None
    return sampled, np.concatenate(parts, axis=0)[-rows:]


def _predictions(profile: Profile, batches: Sequence[Batch], rows: int) -> Array | None:
    """The newest ``rows`` predictions as one number each (the class, or the row's mean)."""
    if profile.prediction is None or not batches:
        return None
    values = np.concatenate([b.prediction_numbers() for b in batches])[-rows:]
    values = values[~np.isnan(values)]
    return values if values.size else None


# -- JSON -------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _finite_tree(data: Any) -> Any:
    if isinstance(data, float):
        return _finite(data)
    if isinstance(data, Mapping):
        return {k: _finite_tree(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite_tree(v) for v in data]
    return data
