"""Rich tables for registry objects, shared by the commands and the quickstart."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from torchops.cli._common import format_bytes, format_diff, format_time
from torchops.types import AliasEvent, ModelInfo, ModelVersion, Signature

if TYPE_CHECKING:
    from torchops.packaging import ExportReport

__all__ = [
    "alias_events_table",
    "models_table",
    "reports_table",
    "version_view",
    "versions_table",
]


def _metrics_text(metrics: Mapping[str, float], limit: int = 4, separator: str = " ") -> str:
    items = [f"{k}={v:.4g}" for k, v in sorted(metrics.items())]
    if len(items) > limit:
        items = [*items[:limit], "…"]
    return separator.join(items)


def _version_text(version: int | None) -> str:
    return "-" if version is None else f"v{version}"


def _add_row(table: Table, *cells: str | Text) -> None:
    """Add a row whose text is shown as is (user text is never read as rich markup)."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _table(title: str, columns: Sequence[str], *, right: Iterable[str] = ()) -> Table:
    """A table whose first columns never wrap and whose cells never lose text."""
    table = Table(title=title, title_justify="left")
    right = set(right)
    for index, column in enumerate(columns):
        table.add_column(
            column,
            justify="right" if column in right else "left",
            no_wrap=index < 2,
            overflow="fold",
        )
    return table


def models_table(models: Sequence[ModelInfo]) -> Table:
    columns = ("name", "created (UTC)", "versions", "latest", "aliases", "description")
    table = _table("Models", columns, right={"versions", "latest"})
    for info in models:
        aliases = ", ".join(f"{a}→v{v}" for a, v in sorted(info.aliases.items()))
        _add_row(
            table,
            info.name,
            format_time(info.created_at, short=True),
            str(info.version_count),
            _version_text(info.latest_version),
            aliases or "-",
            info.description or "",
        )
    return table


def versions_table(name: str, versions: Sequence[ModelVersion]) -> Table:
    columns = ("version", "created (UTC)", "aliases", "formats", "metrics")
    table = _table(f"Versions of {name}", columns, right={"version"})
    for mv in versions:
        _add_row(
            table,
            f"v{mv.version}" if mv.parent is None else f"v{mv.version} ← v{mv.parent}",
            format_time(mv.created_at, short=True),
            "\n".join(mv.aliases) or "-",
            "\n".join(mv.formats),
            _metrics_text(mv.metrics, separator="\n"),
        )
    return table


def reports_table(reports: Iterable[ExportReport], title: str = "Formats and parity") -> Table:
    """One row per format: whether it was recorded and how far it is from eager."""
    table = Table(title=title, title_justify="left")
    table.add_column("format")
    table.add_column("status")
    table.add_column("max abs diff", justify="right")
    table.add_column("max rel diff", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("note")
    for report in reports:
        status = Text("ok", style="green") if report.ok else Text("failed", style="red")
        _add_row(
            table,
            report.format,
            status,
            format_diff(report.max_abs_diff),
            format_diff(report.max_rel_diff),
            f"{report.seconds:.2f}",
            report.error or ("already recorded" if report.details.get("already_recorded") else ""),
        )
    return table


def alias_events_table(name: str, events: Sequence[AliasEvent]) -> Table:
    columns = ("time (UTC)", "alias", "from", "to", "actor", "reason")
    table = _table(f"Alias history of {name}", columns)
    for event in events:
        _add_row(
            table,
            format_time(event.at).removesuffix(" UTC"),
            event.alias,
            _version_text(event.from_version),
            _version_text(event.to_version) if event.to_version is not None else "(removed)",
            event.actor,
            event.reason or "",
        )
    return table


def _signature_table(signature: Signature) -> Table:
    table = Table(title="Signature", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for role, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            _add_row(table, role, spec.name, spec.dtype, str(list(spec.shape)))
    return table


def _artifacts_table(mv: ModelVersion) -> Table:
    table = Table(title="Artifacts", title_justify="left")
    for column in ("kind", "size", "sha256", "details"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for kind, info in sorted(mv.artifacts.items()):
        details = " ".join(f"{k}={_short(v)}" for k, v in sorted(info.details.items()))
        _add_row(table, kind, format_bytes(info.size), info.sha256[:12], details)
    return table


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def version_view(mv: ModelVersion) -> RenderableType:
    """Everything ``torchops show`` prints about one version."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    labels = mv.signature.labels
    rows: list[tuple[str, str]] = [
        ("model", f"{mv.name}:{mv.version}"),
        ("created", format_time(mv.created_at)),
        ("aliases", ", ".join(mv.aliases) or "-"),
        ("task", mv.task),
        ("labels", ", ".join(labels) if labels else "-"),
        ("formats", ", ".join(mv.formats)),
        ("source", mv.source),
        ("parent", _version_text(mv.parent)),
        ("description", mv.description or "-"),
        ("tags", " ".join(f"{k}={v}" for k, v in sorted(mv.tags.items())) or "-"),
        ("metrics", _metrics_text(mv.metrics, limit=20) or "-"),
    ]
    for key, value in rows:
        _add_row(facts, key, value)
    return Group(facts, Text(""), _signature_table(mv.signature), _artifacts_table(mv))
