"""The quickstart's monitoring step: feedback for live predictions, then a shifted batch.

It needs the server the serve step started (``ctx.server_url``, ``ctx.token``):

1. adds two alert rules to the model (accuracy of the last 200 labelled rows below 0.9,
   half of the input features drifting);
2. sends the test set as inference requests (several rows per request) and then their true
   labels in one batch of feedback (``POST /v2/models/{m}/feedback`` with ``items``);
3. sends intensity-inverted test digits (``1 - x``: dark strokes on a light page), enough
   to fill a whole drift window of the server's monitor, with their labels too;
4. reads the live view (``GET /v2/models/{m}/quality``) after each phase, and waits up to
   a few snapshot intervals for the alerts to fire (``GET /v2/models/{m}/alerts``).

What it shows: accuracy collapsing on the inverted digits once their labels arrive,
nearly every pixel feature flagged as drifted, the prediction distribution drifting, and
the alerts that fired.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from torchops.errors import Conflict, TorchopsError, Unavailable
from torchops.types import Array

if TYPE_CHECKING:
    import httpx

    from torchops.quickstart.steps import QuickstartContext

__all__ = ["MonitorSummary", "Phase", "monitor_step", "run_monitoring", "show_monitoring"]

#: rows per inference request
ROWS_PER_REQUEST = 50
#: the alert rules the step adds: (name, metric, op, threshold, window, min samples)
RULES: tuple[tuple[str, str, str, float, int | None, int], ...] = (
    ("quickstart-accuracy", "accuracy", "<", 0.9, 200, 50),
    ("quickstart-drift", "drift_share", ">=", 0.5, None, 0),
)
#: how long to wait for the monitor to publish and evaluate the alerts (its snapshot
#: interval is 10 s by default)
ALERT_TIMEOUT_S = 45.0


@dataclass(frozen=True, slots=True)
class Phase:
    """The live view after one batch of traffic and its feedback."""

    name: str
    rows: int
    accepted: int
    quality: dict[str, Any]

    def window(self, name: str) -> dict[str, Any]:
        windows: dict[str, dict[str, Any]] = self.quality.get("windows") or {}
        return windows.get(name) or {}

    @property
    def drift(self) -> dict[str, Any] | None:
        drift: dict[str, Any] | None = self.quality.get("drift")
        return drift


@dataclass
class MonitorSummary:
    """What the step saw: each phase, and the alerts that fired while it waited."""

    phases: list[Phase] = field(default_factory=list)
    fired: list[dict[str, Any]] = field(default_factory=list)
    waited_s: float = 0.0


def monitor_step(ctx: QuickstartContext) -> None:
    summary = run_monitoring(ctx)
    show_monitoring(ctx, summary)


def run_monitoring(ctx: QuickstartContext) -> MonitorSummary:
    """Send clean then shifted traffic with feedback; return the live views and alerts."""
    import httpx

    from torchops.monitoring.client import FeedbackClient

    data, _ = ctx.trained()
    mv = ctx.registered()
    if ctx.server_url is None or ctx.token is None:
        raise Unavailable("the monitoring step needs the server of the serve step")
    _add_rules(ctx, mv.name)
    summary = MonitorSummary()
    headers = {"Authorization": f"Bearer {ctx.token}"}
    with (
        httpx.Client(
            base_url=ctx.server_url, headers=headers, timeout=60.0, trust_env=False
        ) as http,
        FeedbackClient(ctx.server_url, ctx.token) as feedback,
    ):
        sender = _Sender(http, mv.name, mv.signature.inputs[0].name, mv.signature.inputs[0].dtype)
        x, y = data.x_test, data.y_test
        ids = sender.predict(x, f"qs-{ctx.run_id}-clean")
        result = feedback.send_many(mv.name, list(zip(ids, y.tolist(), strict=True)))
        summary.phases.append(Phase("test digits", len(ids), result.accepted, sender.quality()))

        # enough inverted digits that the monitor's latest full drift window holds only them
        window = int(summary.phases[0].quality.get("settings", {}).get("drift_window", 500))
        served = sum(r.requests for r in ctx.serve_results) + len(ids)
        rows = (window - served % window) + window
        order = np.arange(rows) % len(x)
        shifted_ids = sender.predict(1.0 - x[order], f"qs-{ctx.run_id}-inverted")
        items = list(zip(shifted_ids, y[order].tolist(), strict=True))
        result = feedback.send_many(mv.name, items)
        summary.phases.append(Phase("inverted digits", rows, result.accepted, sender.quality()))

        start = time.monotonic()
        wanted = {name for name, *_ in RULES}
        while time.monotonic() - start < ALERT_TIMEOUT_S:
            active = http.get(f"/v2/models/{mv.name}/alerts").json().get("active", [])
            summary.fired = [
                e for e in active if e.get("rule") in wanted and e.get("version") == mv.version
            ]
            if {e["rule"] for e in summary.fired} == wanted:
                break
            time.sleep(0.5)
        summary.waited_s = time.monotonic() - start
    return summary


def _add_rules(ctx: QuickstartContext, model: str) -> None:
    from torchops.monitoring.alerts import AlertRule, AlertStore

    store = AlertStore(ctx.registry.engine)
    for name, metric, op, threshold, window, min_samples in RULES:
        with contextlib.suppress(Conflict):  # kept from an earlier quickstart
            store.add_rule(AlertRule(model, name, metric, op, threshold, window, min_samples))


class _Sender:
    """Inference requests of several rows each; returns the request id of every row."""

    def __init__(self, http: httpx.Client, model: str, input_name: str, dtype: str) -> None:
        from torchops.serving.datatypes import datatype_of

        self.http = http
        self.model = model
        self.input_name = input_name
        self.datatype = datatype_of(dtype)

    def predict(self, x: Array, prefix: str) -> list[str]:
        ids: list[str] = []
        for n, start in enumerate(range(0, len(x), ROWS_PER_REQUEST)):
            rows = np.ascontiguousarray(x[start : start + ROWS_PER_REQUEST])
            body = {
                "id": f"{prefix}-{n}",
                "inputs": [
                    {
                        "name": self.input_name,
                        "shape": list(rows.shape),
                        "datatype": self.datatype,
                        "data": rows.reshape(-1).tolist(),
                    }
                ],
            }
            response = self.http.post(f"/v2/models/{self.model}/infer", json=body)
            if response.status_code != 200:
                raise TorchopsError(
                    f"inference request {n} failed: HTTP {response.status_code} "
                    f"{response.text[:200]}"
                )
            request_id = response.json()["id"]
            if len(rows) == 1:
                ids.append(request_id)
            else:  # a request of several rows is observed row by row as <id>/<row>
                ids += [f"{request_id}/{i}" for i in range(len(rows))]
        return ids

    def quality(self) -> dict[str, Any]:
        response = self.http.get(f"/v2/models/{self.model}/quality")
        if response.status_code != 200:
            raise TorchopsError(f"GET quality failed: HTTP {response.status_code} {response.text}")
        data: dict[str, Any] = response.json()
        return data


# -- output -----------------------------------------------------------------------------


def _number(value: Any, fmt: str = ".4f") -> str:
    return "-" if not isinstance(value, int | float) else format(value, fmt)


def _drift_cell(drift: Mapping[str, Any] | None) -> Text:
    if not drift or not drift.get("features"):
        return Text("no verdict yet")
    features = drift["features"]
    drifted = sum(bool(f.get("drifted")) for f in features)
    label = "DRIFT" if drift.get("dataset_drifted") else "no drift"
    style = "bold red" if drift.get("dataset_drifted") else "green"
    return Text(f"{label}: {drifted}/{len(features)} features", style=style)


def _prediction_cell(drift: Mapping[str, Any] | None) -> Text:
    prediction = (drift or {}).get("prediction")
    if not prediction:
        return Text("-")
    style = "bold red" if prediction.get("drifted") else "green"
    verdict = "DRIFT" if prediction.get("drifted") else "no drift"
    return Text(f"{verdict} (PSI {_number(prediction.get('psi'), '.2f')})", style=style)


def show_monitoring(ctx: QuickstartContext, summary: MonitorSummary) -> None:
    """Print the phases side by side, the most drifted features and the alerts."""
    settings = summary.phases[0].quality.get("settings", {}) if summary.phases else {}
    last_n = f"last {settings.get('quality_window', 'N')} labelled"
    table = Table(
        title="Live monitoring (GET /v2/models/{m}/quality) after each batch and its labels",
        title_justify="left",
    )
    table.add_column("")
    for phase in summary.phases:
        table.add_column(f"{phase.name} ({phase.rows} rows)", justify="right")

    def row(label: str, cells: Sequence[str | Text]) -> None:
        table.add_row(label, *cells)

    phases = summary.phases
    row("labels accepted", [f"{p.accepted}/{p.rows}" for p in phases])
    row(f"accuracy, {last_n}", [_number(p.window("last_n").get("accuracy")) for p in phases])
    row(f"macro F1, {last_n}", [_number(p.window("last_n").get("f1_macro")) for p in phases])
    row("accuracy, cumulative", [_number(p.window("cumulative").get("accuracy")) for p in phases])
    row("input drift (latest window)", [_drift_cell(p.drift) for p in phases])
    row("prediction drift", [_prediction_cell(p.drift) for p in phases])
    ctx.console.print(table)
    last = phases[-1].drift if phases else None
    if last and last.get("features"):
        top = sorted(last["features"], key=lambda f: f.get("psi") or 0.0, reverse=True)[:5]
        names = ", ".join(f"{f['name']} (PSI {_number(f.get('psi'), '.1f')})" for f in top)
        ctx.console.print(f"most drifted pixels: {escape(names)}")
    if summary.fired:
        for event in summary.fired:
            ctx.console.print(
                Text(f"alert firing: {event.get('message', event.get('rule'))}", style="red")
            )
        ctx.console.print(
            f"(the monitor evaluated the alert rules within {summary.waited_s:.0f} s)"
        )
    else:
        ctx.console.print(
            Text(
                f"no alert fired within {summary.waited_s:.0f} s (the monitor evaluates them "
                "every snapshot interval)",
                style="yellow",
            )
        )
    from torchops.config import Settings

    mv = ctx.registered()
    flag = "" if ctx.settings.home == Settings().home else f" --home {ctx.settings.home}"
    command = f"{ctx.command} monitor {mv.name}{flag} --html report.html"
    ctx.console.print(f"the full report: {escape(command)}", soft_wrap=True)
