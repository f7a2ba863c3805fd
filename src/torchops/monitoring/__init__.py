"""Monitoring: observations, feedback, live quality, drift against reference profiles, alerts.

``build_profile`` summarises a version's reference sample at registration; a
``DriftWindow`` bins live inputs against it and scores drift; ``ClassificationQuality`` /
``RegressionQuality`` keep incremental quality metrics over sliding windows; the stores
keep observations, feedback, snapshots and alert rules in the registry's database.
Importing this package does no work; names load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "AlertEvaluator",
    "AlertEvent",
    "AlertRule",
    "AlertStore",
    "ClassificationQuality",
    "DriftConfig",
    "DriftReport",
    "DriftWindow",
    "FeatureDrift",
    "FeatureProfile",
    "FeedbackClient",
    "FeedbackResult",
    "FeedbackStore",
    "Monitor",
    "MonitorOptions",
    "MonitorReport",
    "Observation",
    "ObservationStore",
    "ObservationWriter",
    "Profile",
    "PrometheusSink",
    "RegressionQuality",
    "Snapshot",
    "SnapshotStore",
    "TensorBoardSink",
    "bin_counts",
    "build_profile",
    "build_report",
    "extract",
    "feature_names",
    "make_quality",
    "segment_dir",
]

_LAZY = {
    "AlertEvaluator": "torchops.monitoring.alerts",
    "AlertEvent": "torchops.monitoring.alerts",
    "AlertRule": "torchops.monitoring.alerts",
    "AlertStore": "torchops.monitoring.alerts",
    "ClassificationQuality": "torchops.monitoring.quality",
    "DriftConfig": "torchops.monitoring.drift",
    "DriftReport": "torchops.monitoring.drift",
    "DriftWindow": "torchops.monitoring.drift",
    "FeatureDrift": "torchops.monitoring.drift",
    "FeatureProfile": "torchops.monitoring.profiles",
    "FeedbackClient": "torchops.monitoring.client",
    "FeedbackResult": "torchops.monitoring.feedback",
    "FeedbackStore": "torchops.monitoring.feedback",
    "Monitor": "torchops.monitoring.monitor",
    "MonitorOptions": "torchops.monitoring.monitor",
    "MonitorReport": "torchops.monitoring.report",
    "Observation": "torchops.monitoring.observations",
    "ObservationStore": "torchops.monitoring.observations",
    "ObservationWriter": "torchops.monitoring.observations",
    "Profile": "torchops.monitoring.profiles",
    "PrometheusSink": "torchops.monitoring.sinks",
    "RegressionQuality": "torchops.monitoring.quality",
    "Snapshot": "torchops.monitoring.snapshots",
    "SnapshotStore": "torchops.monitoring.snapshots",
    "TensorBoardSink": "torchops.monitoring.sinks",
    "bin_counts": "torchops.monitoring.profiles",
    "build_profile": "torchops.monitoring.profiles",
    "build_report": "torchops.monitoring.report",
    "extract": "torchops.monitoring.features",
    "feature_names": "torchops.monitoring.features",
    "make_quality": "torchops.monitoring.quality",
    "segment_dir": "torchops.monitoring._segments",
}

if TYPE_CHECKING:
    from torchops.monitoring._segments import segment_dir
    from torchops.monitoring.alerts import AlertEvaluator, AlertEvent, AlertRule, AlertStore
    from torchops.monitoring.client import FeedbackClient
    from torchops.monitoring.drift import DriftConfig, DriftReport, DriftWindow, FeatureDrift
    from torchops.monitoring.features import extract, feature_names
    from torchops.monitoring.feedback import FeedbackResult, FeedbackStore
    from torchops.monitoring.monitor import Monitor, MonitorOptions
    from torchops.monitoring.observations import (
        Observation,
        ObservationStore,
        ObservationWriter,
    )
    from torchops.monitoring.profiles import FeatureProfile, Profile, bin_counts, build_profile
    from torchops.monitoring.quality import (
        ClassificationQuality,
        RegressionQuality,
        make_quality,
    )
    from torchops.monitoring.report import MonitorReport, build_report
    from torchops.monitoring.sinks import PrometheusSink, TensorBoardSink
    from torchops.monitoring.snapshots import Snapshot, SnapshotStore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchops.monitoring' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
