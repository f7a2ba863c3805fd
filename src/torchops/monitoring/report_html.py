"""The monitoring report as one self-contained HTML page: inline CSS and SVG, no script,
no external URL — it opens offline, can be mailed or attached to a ticket.

Sections: a summary strip, quality (metric cards, metric over time, confusion matrix,
per-class scores), drift (per-feature bar chart and table, prediction drift, drift share
over time) and alerts (rules, active and recent events).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from torchops.monitoring._svg import Bar, Series, bar_chart, heatmap, line_chart
from torchops.monitoring.drift import DriftConfig, FeatureDrift
from torchops.monitoring.report import MonitorReport

__all__ = ["render_html", "write_html"]

#: features shown in the drift chart and table
TOP_FEATURES = 20

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f1f5f9;color:#0f172a;font:14px/1.45 system-ui,-apple-system,
'Segoe UI',sans-serif}
main{max-width:1120px;margin:0 auto;padding:24px}
header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;color:#64748b}
section{background:#fff;border-radius:10px;padding:18px 20px;margin-top:18px;
box-shadow:0 1px 2px rgba(15,23,42,.08)}
h2{margin:0 0 12px;font-size:17px}
h3{margin:16px 0 8px;font-size:14px;color:#334155}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border-radius:10px;padding:12px 16px;min-width:150px;flex:1;
box-shadow:0 1px 2px rgba(15,23,42,.08)}
.card .k{color:#64748b;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:22px;font-weight:600;margin-top:2px}
.card .s{color:#64748b;font-size:12px}
.ok{color:#15803d}.bad{color:#dc2626}.warn{color:#b45309}.muted{color:#64748b}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e2e8f0}
th{color:#475569;font-weight:600;background:#f8fafc}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.pill{display:inline-block;border-radius:999px;padding:1px 9px;font-size:12px;font-weight:600}
.pill.bad{background:#fee2e2}.pill.ok{background:#dcfce7}.pill.warn{background:#fef3c7}
.note{color:#64748b;margin:6px 0 0}
summary{cursor:pointer;color:#334155;margin:8px 0}
footer{color:#94a3b8;font-size:12px;margin-top:18px;text-align:center}
"""


def write_html(report: MonitorReport, path: str | Path) -> None:
    """Write ``render_html(report)`` to ``path`` (UTF-8)."""
    Path(path).write_text(render_html(report), encoding="utf-8")


def render_html(report: MonitorReport) -> str:
    title = f"{report.model} v{report.version} — torchops monitor"
    body = [
        _header(report),
        _quality(report),
        _drift(report),
        _alerts(report),
        f"<footer>generated {escape(_time(report))} by torchops monitor</footer>",
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def _time(report: MonitorReport) -> str:
    return report.generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _card(key: str, value: str, sub: str = "", tone: str = "") -> str:
    return (
        f'<div class="card"><div class="k">{escape(key)}</div>'
        f'<div class="v {tone}">{escape(value)}</div><div class="s">{escape(sub)}</div></div>'
    )


def _header(report: MonitorReport) -> str:
    headline = report.key_metrics[0]
    recent, cumulative = report.recent.metrics, report.cumulative.metrics
    cards = [
        _card("predictions", f"{report.observations:,}", f"{report.labelled:,} labelled"),
        _card(
            f"{headline} · last {report.window}",
            _fmt(recent.get(headline)),
            f"cumulative {_fmt(cumulative.get(headline))} · {report.recent.count} labelled",
            _tone_change(headline, recent.get(headline), cumulative.get(headline)),
        ),
    ]
    drift = report.drift
    if drift is not None and drift.features:
        drifted = sum(f.drifted for f in drift.features)
        cards.append(
            _card(
                "input drift",
                "drift" if drift.dataset_drifted else "no drift",
                f"{drifted} of {len(drift.features)} features · {drift.rows} rows",
                "bad" if drift.dataset_drifted else "ok",
            )
        )
    else:
        cards.append(_card("input drift", "no verdict", report.drift_note or "", "muted"))
    firing = len(report.active)
    cards.append(
        _card(
            "alerts",
            f"{firing} firing" if firing else "none firing",
            f"{len(report.rules)} rules",
            "bad" if firing else "ok",
        )
    )
    return (
        f"<header><h1>{escape(report.model)} "
        f'<span class="muted">v{report.version}</span></h1>'
        f"<p>{escape(report.task)} model · report of {escape(_time(report))}</p></header>"
        f'<div class="cards">{"".join(cards)}</div>'
    )


def _tone_change(metric: str, recent: float | None, cumulative: float | None) -> str:
    """Red when the recent window is clearly worse than the cumulative figure."""
    if recent is None or cumulative is None:
        return ""
    lower_is_better = metric in ("mse", "rmse", "mae", "log_loss")
    worse = recent - cumulative if lower_is_better else cumulative - recent
    scale = max(abs(cumulative), 1e-12)
    return "bad" if worse / scale > 0.05 else "ok"


# -- quality ----------------------------------------------------------------------------


def _quality(report: MonitorReport) -> str:
    parts = ["<section><h2>Quality</h2>"]
    if report.labelled == 0:
        parts.append(
            '<p class="note">No labelled predictions yet: send feedback '
            "(<code>torchops feedback</code> or <code>POST /v2/models/{m}/feedback</code>) "
            "to measure quality.</p></section>"
        )
        return "".join(parts)
    rows = []
    for metric in report.key_metrics:
        if metric not in report.cumulative.metrics:
            continue
        rows.append(
            f"<tr><td>{escape(metric)}</td>"
            f'<td class="n">{_fmt(report.cumulative.metrics.get(metric))}</td>'
            f'<td class="n">{_fmt(report.recent.metrics.get(metric))}</td></tr>'
        )
    rows.append(
        f'<tr><td>labelled rows</td><td class="n">{report.cumulative.count:,}</td>'
        f'<td class="n">{report.recent.count:,}</td></tr>'
    )
    table = (
        '<table><tr><th>metric</th><th class="n">cumulative</th>'
        f'<th class="n">last {report.window}</th></tr>{"".join(rows)}</table>'
    )
    series = [
        Series(metric, [(p.at, p.value) for p in report.trends[metric]])
        for metric in report.key_metrics
        if metric in report.trends and metric != "log_loss"
    ]
    thresholds = [
        (f"alert {r.name}", r.threshold)
        for r in report.rules
        if r.metric in {s.name for s in series}
    ]
    bounded = report.task == "classification"
    chart = line_chart(
        series,
        "metric over time",
        thresholds=thresholds,
        y_range=_unit_range(series, thresholds) if bounded else None,
    )
    source = (
        "from the monitor's stored snapshots"
        if report.trend_source.startswith("snapshots")
        else f"last-{report.window} window as labelled predictions accumulated"
    )
    parts.append(
        f'<div class="row"><div style="flex:1;min-width:260px">{table}</div>'
        f'<div style="flex:2;min-width:420px"><h3>Metric over time</h3>{chart}'
        f'<p class="note">{escape(source)}</p></div></div>'
    )
    confusion = report.recent.confusion
    if confusion is not None and report.labels is not None and report.recent.count:
        labels = list(report.labels)
        parts.append(
            '<div class="row"><div>'
            f"<h3>Confusion matrix · last {report.window}</h3>"
            f"{heatmap(confusion, labels, 'confusion matrix')}</div>"
            f'<div style="flex:1;min-width:300px"><h3>Per class · last {report.window}</h3>'
            f"{_per_class(report.recent.metrics, labels)}</div></div>"
        )
    parts.append("</section>")
    return "".join(parts)


def _unit_range(
    series: Sequence[Series], thresholds: Sequence[tuple[str, float]]
) -> tuple[float, float]:
    values = [v for s in series for _, v in s.points] + [t for _, t in thresholds]
    low = min(values, default=0.0)
    return (max(0.0, math.floor(low * 10) / 10 - 0.05) if low > 0.2 else 0.0), 1.0


def _per_class(metrics: dict[str, float], labels: Iterable[str]) -> str:
    rows = []
    for label in labels:
        f1 = metrics.get(f"f1[{label}]")
        tone = "bad" if f1 is not None and f1 < 0.5 else ""
        rows.append(
            f"<tr><td>{escape(label)}</td>"
            f'<td class="n">{_fmt(metrics.get(f"precision[{label}]"), 3)}</td>'
            f'<td class="n">{_fmt(metrics.get(f"recall[{label}]"), 3)}</td>'
            f'<td class="n {tone}">{_fmt(f1, 3)}</td></tr>'
        )
    return (
        '<table><tr><th>class</th><th class="n">precision</th><th class="n">recall</th>'
        f'<th class="n">F1</th></tr>{"".join(rows)}</table>'
    )


# -- drift ------------------------------------------------------------------------------


def _verdict(feature: FeatureDrift) -> str:
    return (
        '<span class="pill bad">drift</span>'
        if feature.drifted
        else ('<span class="pill ok">ok</span>')
    )


def _drift(report: MonitorReport) -> str:
    parts = ["<section><h2>Drift</h2>"]
    drift = report.drift
    if drift is None or not drift.features:
        parts.append(f'<p class="note">{escape(report.drift_note or "no drift verdict")}</p>')
    if drift is not None and drift.features:
        drifted = sum(f.drifted for f in drift.features)
        tone = "bad" if drift.dataset_drifted else "ok"
        method = drift.features[0].method
        test = (
            "PSI ≥ 0.2 or JS ≥ 0.1 on fixed reference bins"
            if method == "psi"
            else "two-sample KS test against the reference sample, p < 0.05"
        )
        parts.append(
            f'<p><span class="pill {tone}">'
            f"{'dataset drift' if drift.dataset_drifted else 'no dataset drift'}</span> "
            f"{drifted} of {len(drift.features)} features drifted "
            f"({drift.drifted_share:.0%}; the dataset drifts at {DriftConfig().share:.0%}) "
            f"over the last {drift.rows} rows with inputs — {escape(test)}.</p>"
        )
        top = sorted(drift.features, key=lambda f: (f.drifted, f.psi), reverse=True)
        top = top[:TOP_FEATURES]
        bars = [
            Bar(
                f.name,
                f.psi,
                f.drifted,
                f"p={f.p_value:.1e}" if f.p_value is not None else f"JS {f.js:.2f}",
            )
            for f in sorted(top, key=lambda f: f.psi, reverse=True)
        ]
        chart = bar_chart(bars, "PSI per feature", threshold=("PSI threshold", 0.2))
        parts.append(
            f"<h3>PSI per feature (top {len(bars)} of {len(drift.features)}; red = drifted)</h3>"
            f"{chart}<details><summary>scores of these {len(top)} features</summary>"
            f"{_features_table(top)}</details>"
        )
    if drift is not None and drift.prediction is not None:
        p = drift.prediction
        detail = f"PSI {_fmt(p.psi, 3)}, JS {_fmt(p.js, 3)}"
        if p.p_value is not None:
            detail += f", {p.method} p = {p.p_value:.2e}"
        parts.append(f"<h3>Prediction drift</h3><p>{_verdict(p)} {escape(detail)}</p>")
    if len(report.drift_trend) >= 2:
        series = [Series("drifted share", [(p.at, p.value) for p in report.drift_trend])]
        chart = line_chart(
            series,
            "drifted share over time",
            thresholds=[("dataset drift", DriftConfig().share)],
            y_range=(0.0, 1.0),
            height=200,
        )
        parts.append(f"<h3>Share of drifted features over time</h3>{chart}")
    parts.append("</section>")
    return "".join(parts)


def _features_table(features: Sequence[FeatureDrift]) -> str:
    rows = [
        f"<tr><td>{escape(f.name)}</td><td class='n'>{_fmt(f.psi, 3)}</td>"
        f"<td class='n'>{_fmt(f.js, 3)}</td>"
        f"<td class='n'>{'-' if f.p_value is None else f'{f.p_value:.2e}'}</td>"
        f"<td>{escape(f.method)}</td><td>{_verdict(f)}</td></tr>"
        for f in features
    ]
    return (
        "<table><tr><th>feature</th><th class='n'>PSI</th><th class='n'>JS</th>"
        "<th class='n'>p-value</th><th>test</th><th>verdict</th></tr>"
        f"{''.join(rows)}</table>"
    )


# -- alerts -----------------------------------------------------------------------------


def _alerts(report: MonitorReport) -> str:
    parts = ["<section><h2>Alerts</h2>"]
    firing = {(e.rule, e.version) for e in report.active}
    if report.rules:
        rows = []
        for rule in report.rules:
            on = sorted(v for name, v in firing if name == rule.name)
            state = (
                f'<span class="pill bad">firing on v{", v".join(map(str, on))}</span>'
                if on
                else '<span class="pill ok">ok</span>'
            )
            window = "monitor default" if rule.window is None else f"last {rule.window}"
            rows.append(
                f"<tr><td>{escape(rule.name)}</td>"
                f"<td>{escape(f'{rule.metric} {rule.op} {rule.threshold:g}')}</td>"
                f"<td>{escape(window)}</td><td class='n'>{rule.min_samples}</td>"
                f"<td>{state}</td></tr>"
            )
        parts.append(
            "<table><tr><th>rule</th><th>fires when</th><th>window</th>"
            f"<th class='n'>min samples</th><th>state</th></tr>{''.join(rows)}</table>"
        )
    else:
        parts.append(
            '<p class="note">No alert rules: add one with <code>torchops alerts add '
            f"{escape(report.model)} --metric accuracy --op '&lt;' --threshold 0.9</code>.</p>"
        )
    if report.events:
        rows = [
            f"<tr><td>{escape(e.at.strftime('%Y-%m-%d %H:%M:%S'))}</td>"
            f"<td>{escape(e.rule)}</td><td>v{e.version}</td>"
            f'<td><span class="pill {"bad" if e.state == "firing" else "ok"}">'
            f"{escape(e.state)}</span></td><td class='n'>{_fmt(e.value)}</td>"
            f"<td>{escape(e.message)}</td></tr>"
            for e in report.events
        ]
        parts.append(
            "<h3>Recent events (newest first, UTC)</h3><table><tr><th>time</th><th>rule</th>"
            "<th>version</th><th>state</th><th class='n'>value</th><th>message</th></tr>"
            f"{''.join(rows)}</table>"
        )
    parts.append("</section>")
    return "".join(parts)
