"""Publishing the live state: Prometheus gauges, TensorBoard, snapshots and alert rules.

Prometheus gets the last-N window's metrics and the latest drift verdict of every version
on every round. The rest is written only when something changed (new labelled rows or a
new full drift window): TensorBoard scalars ``quality/<window>/<metric>`` with drift and
histograms of the latest inputs and outputs, snapshots (``quality`` per window, ``drift``
per scored window), and alert rules evaluated — also when the model's rules changed.

Alert rules see the metrics of the window they name (``AlertRule.window`` rows; None =
the monitor's ``quality_window``) with the window's labelled row count as samples, or the
drift metrics (``DRIFT_METRICS``) of the latest drift report with its row count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from torchops.errors import TorchopsError
from torchops.monitoring._live import LiveVersion
from torchops.monitoring.alerts import AlertEvaluator, AlertRule, AlertStore
from torchops.monitoring.drift import DriftReport
from torchops.monitoring.sinks import PrometheusSink, TensorBoardSink
from torchops.monitoring.snapshots import SnapshotStore
from torchops.types import Array

if TYPE_CHECKING:
    from torchops.monitoring.monitor import MonitorOptions

__all__ = ["DRIFT_METRICS", "Publisher", "Update"]

#: alert metrics taken from the latest drift report rather than a quality window
DRIFT_METRICS = ("drift_share", "dataset_drift", "prediction_psi", "prediction_js")


class _ScopedRules(AlertStore):
    """The alert store, listing only the rules of one scope: a row window, or drift."""

    def __init__(self, engine: Engine, scope: int | None, default_window: int) -> None:
        super().__init__(engine)
        self.scope = scope
        self.default_window = default_window

    def rules(self, model: str) -> list[AlertRule]:
        return [r for r in super().rules(model) if _scope(r, self.default_window) == self.scope]


def _scope(rule: AlertRule, default_window: int) -> int | None:
    """None for drift rules, else the number of labelled rows the rule looks at."""
    if rule.metric in DRIFT_METRICS:
        return None
    return rule.window if rule.window is not None else default_window


@dataclass
class Update:
    """What ``publish`` writes for one version, collected under the monitor's lock."""

    state: LiveVersion
    windows: dict[str, dict[str, Any]]
    report: DriftReport | None
    changed: bool
    drift_changed: bool
    histograms: tuple[Array | None, Array | None] | None
    alerts: dict[int | None, tuple[dict[str, float], int]]
    step: int


def _drift_values(report: DriftReport | None) -> dict[str, float]:
    if report is None or not report.features:
        return {}
    values = {
        "drift_share": report.drifted_share,
        "dataset_drift": float(report.dataset_drifted),
    }
    if report.prediction is not None:
        values["prediction_psi"] = report.prediction.psi
        values["prediction_js"] = report.prediction.js
    return values


class Publisher:
    """Writes versions' live state to the sinks (see the module doc)."""

    def __init__(
        self,
        engine: Engine,
        options: MonitorOptions,
        prometheus: PrometheusSink,
        tensorboard: TensorBoardSink | None,
        snapshots: SnapshotStore,
        alerts: AlertStore,
    ) -> None:
        self.engine = engine
        self.options = options
        self.prometheus = prometheus
        self.tensorboard = tensorboard
        self.snapshots = snapshots
        self.alerts = alerts
        self._seen: dict[str, tuple[AlertRule, ...]] = {}
        self._evaluators: dict[int | None, AlertEvaluator] = {}

    def rules(self, model: str) -> tuple[AlertRule, ...]:
        """The model's alert rules (none when they cannot be read)."""
        try:
            return tuple(self.alerts.rules(model))
        except TorchopsError:
            return ()

    def seen(self, rules: dict[str, tuple[AlertRule, ...]]) -> None:
        """Remember the rules evaluated, so a change in them triggers an evaluation."""
        self._seen.update(rules)

    def close(self, timeout: float | None = None) -> None:
        for evaluator in self._evaluators.values():
            evaluator.close(timeout)
        if self.tensorboard is not None:
            self.tensorboard.close()

    def collect(self, state: LiveVersion, rules: tuple[AlertRule, ...]) -> Update:
        """What to write for ``state`` (call under the monitor's lock; resets its flags)."""
        default = self.options.quality_window
        rules_changed = self._seen.get(state.model) != rules
        windows = state.windows()
        report = state.drift_report()
        groups: dict[int | None, tuple[dict[str, float], int]] = {}
        if state.changed or state.drift_changed or rules_changed:
            for scope in {_scope(r, default) for r in rules}:
                if scope is None:
                    groups[None] = (_drift_values(report), report.rows if report else 0)
                else:
                    tracker = state.window(scope)
                    groups[scope] = (tracker.metrics(), tracker.count)
        update = Update(
            state=state,
            windows=windows,
            report=report,
            changed=state.changed,
            drift_changed=state.drift_changed,
            histograms=state.take_histograms() if state.changed or state.drift_changed else None,
            alerts=groups,
            step=state.step,
        )
        if state.changed or state.drift_changed:
            state.step += 1
        state.changed = state.drift_changed = False
        return update

    def write(self, update: Update) -> None:
        """Write one version's update to every sink (outside the monitor's lock)."""
        state = update.state
        model, version = state.model, state.version
        last_n = {k: v for k, v in update.windows["last_n"].items() if k != "confusion"}
        self.prometheus.write(model, version, last_n, update.report)
        if not self.options.leader:
            return
        if update.changed or update.drift_changed:
            if self.tensorboard is not None:
                scalars = {
                    f"{name}/{key}": value
                    for name, values in update.windows.items()
                    for key, value in values.items()
                    if key != "confusion"
                }
                inputs, outputs = update.histograms or (None, None)
                self.tensorboard.write(
                    model, version, update.step, scalars, update.report, inputs, outputs
                )
            if update.changed:
                opts = self.options
                names = {
                    "cumulative": "cumulative",
                    "last_n": f"last_{opts.quality_window}",
                    "last_t": f"last_{opts.quality_window_seconds:g}s",
                }
                for key, label in names.items():
                    self.snapshots.write(model, version, "quality", label, update.windows[key])
            if update.drift_changed and update.report is not None:
                label = f"last_{self.options.drift_window}"
                self.snapshots.write(model, version, "drift", label, update.report.to_dict())
        for scope, (values, samples) in update.alerts.items():
            self._evaluator(scope).evaluate(model, version, values, samples)

    def _evaluator(self, scope: int | None) -> AlertEvaluator:
        evaluator = self._evaluators.get(scope)
        if evaluator is None:
            rules = _ScopedRules(self.engine, scope, self.options.quality_window)
            evaluator = AlertEvaluator(rules, webhook_url=self.options.webhook_url)
            self._evaluators[scope] = evaluator
        return evaluator
