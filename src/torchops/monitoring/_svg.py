"""Small inline SVG charts for the HTML report: a heatmap, a line chart, a bar chart.

Plain strings, no plotting library and no script: the report stays one self-contained
file that any browser (or mail client) shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

__all__ = ["Bar", "Series", "bar_chart", "heatmap", "line_chart", "nice_ticks"]

FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif"
PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#ca8a04")
ALERT = "#dc2626"
MUTED = "#64748b"
GRID = "#e2e8f0"


@dataclass(frozen=True, slots=True)
class Series:
    """A named line of ``(time, value)`` points."""

    name: str
    points: Sequence[tuple[datetime, float]]


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar: a label, its length and whether it is flagged (drawn in the alert colour)."""

    label: str
    value: float
    flagged: bool = False
    note: str = ""


def _open(width: float, height: float, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="img" style="{FONT};max-width:100%">'
        f"<title>{escape(title)}</title>"
    )


def _text(
    x: float,
    y: float,
    text: str,
    *,
    size: int = 11,
    anchor: str = "start",
    halo: bool = False,
    **attrs: str,
) -> str:
    if halo:  # a white outline keeps the text legible over lines
        attrs = {**attrs, "paint_order": "stroke", "stroke": "#fff", "stroke_width": "3"}
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{escape(text)}</text>"
    )


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def heatmap(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> str:
    """A confusion matrix: rows true class, columns predicted; shade = share of the row."""
    n = len(matrix)
    cell = 34 if n <= 12 else max(10, 400 // max(n, 1))
    left, top = 64, 48
    width, height = left + n * cell + 24, top + n * cell + 44
    parts = [_open(width, height, title)]
    parts.append(_text(left + n * cell / 2, 16, "predicted class", size=12, anchor="middle"))
    parts.append(
        f'<text x="14" y="{top + n * cell / 2:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + n * cell / 2:.1f})">true class</text>'
    )
    for i, row in enumerate(matrix):
        total = sum(row)
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            x, y = left + j * cell, top + i * cell
            fill = _shade(share, diagonal=i == j)
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" '
                f'stroke="#fff"><title>true {escape(labels[i])}, predicted '
                f"{escape(labels[j])}: {count} ({share:.0%} of the row)</title></rect>"
            )
            if cell >= 22 and count:
                colour = "#fff" if share > 0.55 else "#0f172a"
                parts.append(
                    _text(
                        x + cell / 2,
                        y + cell / 2 + 4,
                        str(count),
                        size=10,
                        anchor="middle",
                        fill=colour,
                    )
                )
        parts.append(_text(left - 8, top + i * cell + cell / 2 + 4, labels[i], anchor="end"))
    for j, label in enumerate(labels):
        parts.append(_text(left + j * cell + cell / 2, top - 8, label, anchor="middle"))
    parts.append(
        _text(left, top + n * cell + 28, "blue: correct share · red: errors", size=10, fill=MUTED)
    )
    parts.append("</svg>")
    return "".join(parts)


def _shade(share: float, *, diagonal: bool) -> str:
    """White to blue for the diagonal, white to red for errors."""
    share = min(max(share, 0.0), 1.0)
    if share == 0:
        return "#f8fafc"
    end = (37, 99, 235) if diagonal else (220, 38, 38)
    strength = 0.12 + 0.88 * (share if diagonal else min(1.0, share * 2.5))
    rgb = [round(255 + (c - 255) * strength) for c in end]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def line_chart(
    series: Sequence[Series],
    title: str,
    *,
    thresholds: Sequence[tuple[str, float]] = (),
    y_range: tuple[float, float] | None = None,
    width: int = 640,
    height: int = 260,
) -> str:
    """Lines over time with a legend; ``thresholds`` are dashed horizontal rules."""
    drawn = [s for s in series if s.points]
    left, right, top, bottom = 52, 16, 36, 40
    parts = [_open(width, height, title)]
    if not drawn:
        parts.append(
            _text(width / 2, height / 2, "no data yet", size=13, anchor="middle", fill=MUTED)
        )
        parts.append("</svg>")
        return "".join(parts)
    times = [p[0].timestamp() for s in drawn for p in s.points]
    values = [p[1] for s in drawn for p in s.points] + [t for _, t in thresholds]
    t0, t1 = min(times), max(times)
    if t1 == t0:
        t0, t1 = t0 - 1, t1 + 1
    low, high = y_range if y_range is not None else (min(values), max(values))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.06
    if y_range is None:
        low, high = low - pad, high + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * plot_w

    def y_of(v: float) -> float:
        return top + (1 - (v - low) / (high - low)) * plot_h

    for tick in nice_ticks(low, high):
        y = y_of(tick)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        parts.append(_text(left - 6, y + 4, _fmt(tick), size=10, anchor="end", fill=MUTED))
    for k in range(4):
        t = t0 + (t1 - t0) * k / 3
        label = _clock(datetime.fromtimestamp(t, tz=drawn[0].points[0][0].tzinfo), t1 - t0)
        anchor = "start" if k == 0 else "end" if k == 3 else "middle"
        parts.append(
            _text(x_of(t), height - bottom + 16, label, size=10, anchor=anchor, fill=MUTED)
        )
    labels: list[str] = []
    for name, value in thresholds:
        y = y_of(value)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{ALERT}" '
            'stroke-dasharray="5 4" stroke-width="1.2"/>'
        )
        # drawn after the lines, so they stay readable where a line crosses them
        labels.append(
            _text(left + 4, y - 4, f"{name} {_fmt(value)}", size=10, fill=ALERT, halo=True)
        )
    legend_x = float(left)
    for index, line in enumerate(drawn):
        colour = PALETTE[index % len(PALETTE)]
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{x_of(t.timestamp()):.1f},{y_of(v):.1f}"
            for i, (t, v) in enumerate(line.points)
        )
        parts.append(
            f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2" '
            'stroke-linejoin="round"/>'
        )
        last_t, last_v = line.points[-1]
        parts.append(
            f'<circle cx="{x_of(last_t.timestamp()):.1f}" cy="{y_of(last_v):.1f}" r="3.5" '
            f'fill="{colour}"><title>{escape(line.name)}: {_fmt(last_v)}</title></circle>'
        )
        parts.append(f'<rect x="{legend_x:.1f}" y="12" width="12" height="4" fill="{colour}"/>')
        label = f"{line.name} ({_fmt(last_v)})"
        parts.append(_text(legend_x + 16, 18, label, size=11))
        legend_x += 24 + 6.5 * len(label)
    parts += labels
    parts.append("</svg>")
    return "".join(parts)


def _clock(at: datetime, span_s: float) -> str:
    """A time axis label as precise as the axis needs."""
    if span_s < 60:
        return f"{at:%H:%M:%S}.{at.microsecond // 100_000}"
    if span_s < 600:
        return f"{at:%H:%M:%S}"
    return f"{at:%H:%M}" if span_s < 86400 else f"{at:%m-%d %H:%M}"


def bar_chart(
    bars: Sequence[Bar],
    title: str,
    *,
    threshold: tuple[str, float] | None = None,
    width: int = 640,
) -> str:
    """Horizontal bars, largest first as given; flagged bars in the alert colour."""
    row = 20
    label_w = min(200, 12 + 7 * max((len(b.label) for b in bars), default=4))
    left, right, top = label_w, 150, 12
    height = top + row * max(len(bars), 1) + 30
    parts = [_open(width, height, title)]
    top_value = max([b.value for b in bars] + [threshold[1] if threshold else 0.0, 1e-9])
    plot_w = width - left - right
    for i, bar in enumerate(bars):
        y = top + i * row
        length = max(bar.value, 0.0) / top_value * plot_w
        colour = ALERT if bar.flagged else "#94a3b8"
        parts.append(_text(left - 8, y + row / 2 + 4, bar.label, anchor="end"))
        parts.append(
            f'<rect x="{left}" y="{y + 3}" width="{max(length, 1):.1f}" height="{row - 6}" '
            f'rx="2" fill="{colour}"><title>{escape(bar.label)}: {_fmt(bar.value)}'
            f"</title></rect>"
        )
        note = f"{_fmt(bar.value)}  {bar.note}".rstrip()
        parts.append(_text(left + length + 6, y + row / 2 + 4, note, size=10, fill=MUTED))
    if threshold is not None:
        name, value = threshold
        x = left + value / top_value * plot_w
        bottom = top + row * max(len(bars), 1)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="{ALERT}" '
            'stroke-dasharray="4 3"/>'
        )
        parts.append(
            _text(x, bottom + 16, f"{name} {_fmt(value)}", size=10, anchor="middle", fill=ALERT)
        )
    parts.append("</svg>")
    return "".join(parts)
