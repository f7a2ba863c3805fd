"""``torchops monitor REF``: quality, drift and alerts of a served model, from the stores."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from torchops.cli._common import (
    HomeOption,
    JsonOption,
    RegistryUrlOption,
    console,
    open_registry,
    print_json,
    resolve_settings,
)

if TYPE_CHECKING:
    from torchops.monitoring.drift import FeatureDrift
    from torchops.monitoring.report import MonitorReport, TrendPoint

__all__ = ["COMMANDS", "render_report", "sparkline"]

SPARKS = "▁▂▃▄▅▆▇█"
#: features listed in the terminal drift table
TOP_FEATURES = 12
_LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae", "log_loss"})


def monitor(
    ctx: typer.Context,
    ref: Annotated[
        str,
        typer.Argument(metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS.", show_default=False),
    ],
    window: Annotated[
        int, typer.Option(min=1, help="Labelled rows in the recent quality window.")
    ] = 500,
    drift_window: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most recent predictions scored for drift (default: --window).",
            show_default=False,
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            metavar="FILE",
            help="Also write a self-contained HTML report with plots to FILE.",
            show_default=False,
        ),
    ] = None,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Report live quality, drift per feature and alerts of a model version."""
    from torchops.monitoring.report import build_report

    settings = resolve_settings(ctx, home, registry_url)
    with open_registry(settings) as registry:
        report = build_report(registry, ref, window=window, drift_window=drift_window)
    if html is not None:
        from torchops.monitoring.report_html import write_html

        html.parent.mkdir(parents=True, exist_ok=True)
        write_html(report, html)
    if json_:
        data = report.to_dict()
        if html is not None:
            data["html"] = str(html)
        print_json(data)
        return
    out = console()
    out.print(render_report(report))
    if html is not None:
        out.print(Text(f"HTML report written to {html}"))


# -- rendering --------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """``values`` as a row of block characters, the newest on the right.

    More values than ``width`` are averaged in consecutive groups; the scale is the
    series' own range, so a flat series is a flat line.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    if len(finite) > width:
        size = len(finite) / width
        finite = [
            sum(chunk) / len(chunk)
            for chunk in (finite[round(i * size) : round((i + 1) * size)] for i in range(width))
            if chunk
        ]
    low, high = min(finite), max(finite)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return SPARKS[3] * len(finite)
    top = len(SPARKS) - 1
    return "".join(SPARKS[round((v - low) / (high - low) * top)] for v in finite)


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _trend(points: Sequence[TrendPoint], metric: str) -> Text:
    if len(points) < 2:
        return Text("")
    values = [p.value for p in points]
    line = sparkline(values, width=16)
    first, last = values[0], values[-1]
    worse = (last > first) if metric in _LOWER_IS_BETTER else (last < first)
    change = abs(last - first) / max(abs(first), 1e-12)
    style = "red" if worse and change > 0.05 else "green" if change > 0.05 else ""
    return Text(f"{line} {_short(first)}→{_short(last)}", style=style)


def _short(value: float) -> str:
    """At most 3 decimals, fewer for big numbers: a trend's end points in a narrow column."""
    return (
        f"{value:.3f}"
        if abs(value) < 10
        else f"{value:.1f}"
        if abs(value) < 1e3
        else f"{value:.3g}"
    )


def _quality(report: MonitorReport) -> RenderableType:
    title = (
        f"Quality of {report.model} v{report.version} on {report.labelled:,} labelled of "
        f"{report.observations:,} predictions"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("cumulative", justify="right")
    table.add_column(f"last {report.window}", justify="right")
    source = "snapshots" if report.trend_source.startswith("snapshots") else "as labels arrived"
    table.add_column(f"trend ({source})")
    for metric in report.key_metrics:
        if metric not in report.cumulative.metrics:
            continue
        recent = report.recent.metrics.get(metric)
        cumulative = report.cumulative.metrics.get(metric)
        style = ""
        if recent is not None and cumulative is not None:
            worse = recent - cumulative if metric in _LOWER_IS_BETTER else cumulative - recent
            style = "red" if worse / max(abs(cumulative), 1e-12) > 0.05 else ""
        table.add_row(
            metric,
            _number(cumulative),
            Text(_number(recent), style=style),
            _trend(report.trends.get(metric, []), metric),
        )
    table.add_row("labelled rows", f"{report.cumulative.count:,}", f"{report.recent.count:,}", "")
    if report.labelled == 0:
        return Group(
            table,
            Text(
                "no labelled predictions yet: send feedback (torchops feedback, or POST "
                "/v2/models/{m}/feedback) to measure quality",
                style="yellow",
            ),
        )
    return table


def _verdict(feature: FeatureDrift) -> Text:
    return Text("DRIFT", style="bold red") if feature.drifted else Text("ok", style="green")


def _drift(report: MonitorReport) -> RenderableType:
    drift = report.drift
    parts: list[RenderableType] = []
    if drift is None or not drift.features:
        parts.append(Text(f"Drift: {report.drift_note or 'no verdict'}", style="yellow"))
    if drift is not None and drift.features:
        drifted = sum(f.drifted for f in drift.features)
        verdict = (
            Text("dataset DRIFT", style="bold red")
            if drift.dataset_drifted
            else Text("no dataset drift", style="bold green")
        )
        parts.append(
            Text.assemble(
                "Drift over the last ",
                f"{drift.rows:,} rows with inputs: ",
                verdict,
                f" — {drifted} of {len(drift.features)} features drifted "
                f"({drift.drifted_share:.0%})",
            )
        )
        ranked = sorted(drift.features, key=lambda f: (f.drifted, f.psi), reverse=True)
        shown = sorted(ranked[:TOP_FEATURES], key=lambda f: f.psi, reverse=True)
        table = Table(
            title=f"Top {len(shown)} features by PSI", title_justify="left", show_edge=False
        )
        for column in ("feature", "PSI", "JS", "p-value", "test", "verdict"):
            table.add_column(
                column, justify="right" if column in ("PSI", "JS", "p-value") else "left"
            )
        for f in shown:
            table.add_row(
                Text(f.name),
                _number(f.psi, 3),
                _number(f.js, 3),
                "-" if f.p_value is None else f"{f.p_value:.2e}",
                f.method,
                _verdict(f),
            )
        parts.append(table)
    if drift is not None and drift.prediction is not None:
        p = drift.prediction
        detail = f"PSI {_number(p.psi, 3)}, JS {_number(p.js, 3)}"
        if p.p_value is not None:
            detail += f", {p.method} p={p.p_value:.2e}"
        parts.append(Text.assemble("Prediction drift: ", _verdict(p), f" ({detail})"))
    if len(report.drift_trend) >= 2:
        values = [p.value for p in report.drift_trend]
        parts.append(
            Text(f"Drifted share over time: {sparkline(values)} {values[0]:.0%}→{values[-1]:.0%}")
        )
    return Group(*parts)


def _alerts(report: MonitorReport) -> RenderableType:
    from torchops.cli.alerts import alerts_view

    return alerts_view(
        report.model, list(report.rules), list(report.active), list(report.events[:10])
    )


def render_report(report: MonitorReport) -> RenderableType:
    """The terminal report: quality, drift and alerts, separated by blank lines."""
    return Group(_quality(report), Text(""), _drift(report), Text(""), _alerts(report))


COMMANDS: dict[str, Callable[..., Any]] = {"monitor": monitor}
