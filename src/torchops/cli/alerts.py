"""``torchops alerts``: a model's alert rules and their events.

``torchops alerts NAME`` lists (the same as ``alerts list NAME``); ``alerts add`` and
``alerts remove`` change the rules. The server's monitor evaluates them continuously.
"""

from __future__ import annotations

import re
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
    fail,
    format_time,
    open_registry,
    print_json,
    resolve_settings,
)
from torchops.refs import validate_name

if TYPE_CHECKING:
    from torchops.monitoring.alerts import AlertEvent, AlertRule
    from torchops.types import Signature

__all__ = ["alert_metrics", "alerts_view", "app", "default_rule_name"]

OPS = ("<", "<=", ">", ">=")
_OP_WORDS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge"}


class _ListByDefault(typer.core.TyperGroup):
    """``alerts NAME`` means ``alerts list NAME``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["list", *args]
        result: list[str] = super().parse_args(ctx, args)
        return result


app = typer.Typer(
    name="alerts",
    cls=_ListByDefault,
    help="Alert rules of a model and their events: alerts NAME | alerts add | alerts remove.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NameArgument = Annotated[str, typer.Argument(metavar="NAME", help="Model name.")]


@app.command("list")
def list_alerts(
    ctx: typer.Context,
    name: NameArgument,
    limit: Annotated[int, typer.Option(min=1, help="Most recent events to show.")] = 20,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """List the model's rules, the alerts firing now and the recent events."""
    from torchops.monitoring.alerts import AlertStore

    settings = resolve_settings(ctx, home, registry_url)
    with open_registry(settings) as registry:
        registry.get_model(validate_name(name))
        store = AlertStore(registry.engine)
        rules, active = store.rules(name), store.active(name)
        events = store.events(name, limit=limit)
    if json_:
        print_json(
            {
                "model": name,
                "active": [e.to_dict() for e in active],
                "events": [e.to_dict() for e in events],
                "rules": [r.to_dict() for r in rules],
            }
        )
        return
    console().print(alerts_view(name, rules, active, events))


@app.command("add")
def add_rule(
    ctx: typer.Context,
    name: NameArgument,
    metric: Annotated[
        str,
        typer.Option(
            help="What to watch: accuracy, f1_macro, precision_macro, recall_macro, log_loss, "
            "f1[<label>] ...; mse, rmse, mae; count; drift_share, dataset_drift, "
            "prediction_psi, prediction_js.",
            show_default=False,
        ),
    ],
    op: Annotated[
        str, typer.Option(help="Fire when METRIC OP THRESHOLD: <, <=, > or >=.", show_default=False)
    ],
    threshold: Annotated[float, typer.Option(help="The threshold.", show_default=False)],
    window: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Compute the metric over the last N labelled rows (default: the monitor's).",
            show_default=False,
        ),
    ] = None,
    min_samples: Annotated[
        int, typer.Option(min=0, help="Never fire (or resolve) on fewer samples.")
    ] = 30,
    rule_name: Annotated[
        str | None,
        typer.Option(
            "--name", help="Rule name (default: e.g. accuracy-lt-0.9).", show_default=False
        ),
    ] = None,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Add an alert rule to a model."""
    from torchops.monitoring.alerts import AlertRule, AlertStore

    if op not in OPS:
        fail(f"unknown --op {op!r}: choose from {', '.join(OPS)} (quote it in the shell)")
    rule = AlertRule(
        model=validate_name(name),
        name=rule_name if rule_name is not None else default_rule_name(metric, op, threshold),
        metric=metric,
        op=op,
        threshold=threshold,
        window=window,
        min_samples=min_samples,
    )
    settings = resolve_settings(ctx, home, registry_url)
    with open_registry(settings) as registry:
        known = alert_metrics(registry.get(name).signature)
        if metric not in known:
            per_class = ", or per class f1[<label>] ..." if any("[" in m for m in known) else ""
            shown = ", ".join(m for m in known if "[" not in m)
            fail(f"unknown metric {metric!r} for model {name!r}: choose from {shown}{per_class}")
        AlertStore(registry.engine).add_rule(rule)
    if json_:
        print_json(rule.to_dict())
        return
    console().print(
        Text(f"{name}: added rule {rule.name!r} — fires when {_condition(rule)}", style="green")
    )


@app.command("remove")
def remove_rule(
    ctx: typer.Context,
    name: NameArgument,
    rule: Annotated[str, typer.Argument(metavar="RULE", help="Rule name.")],
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Remove an alert rule and its events."""
    from torchops.monitoring.alerts import AlertStore

    settings = resolve_settings(ctx, home, registry_url)
    with open_registry(settings) as registry:
        AlertStore(registry.engine).remove_rule(validate_name(name), rule)
    console().print(Text(f"{name}: removed rule {rule!r}"))


def alert_metrics(signature: Signature) -> list[str]:
    """The metrics a rule of a model with ``signature`` can watch (what the monitor gives
    its evaluator: the quality metrics of the task and the drift metrics)."""
    from torchops.monitoring.monitor import DRIFT_METRICS
    from torchops.monitoring.report import CLASSIFICATION_METRICS, REGRESSION_METRICS

    if signature.task != "classification":
        return [*REGRESSION_METRICS, "count", *DRIFT_METRICS]
    per_class = [
        f"{kind}[{label}]"
        for label in signature.labels or ()
        for kind in ("precision", "recall", "f1")
    ]
    return [*CLASSIFICATION_METRICS, "count", *DRIFT_METRICS, *per_class]


def default_rule_name(metric: str, op: str, threshold: float) -> str:
    """``accuracy-lt-0.9``: a valid rule name that says what the rule watches."""
    text = f"{metric}-{_OP_WORDS.get(op, 'x')}-{threshold:g}"
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")
    return cleaned[:128] or "rule"


def _condition(rule: AlertRule) -> str:
    over = "the monitor's window" if rule.window is None else f"the last {rule.window} rows"
    return (
        f"{rule.metric} {rule.op} {rule.threshold:g} over {over}, "
        f"on at least {rule.min_samples} samples"
    )


def alerts_view(
    name: str,
    rules: list[AlertRule],
    active: list[AlertEvent],
    events: list[AlertEvent],
) -> RenderableType:
    """Rules with their state, then the recent events."""
    parts: list[RenderableType] = []
    firing = {(e.rule, e.version) for e in active}
    if rules:
        table = Table(title=f"Alert rules of {name}", title_justify="left")
        for column in ("rule", "fires when", "window", "min samples", "state"):
            table.add_column(
                column,
                justify="right" if column == "min samples" else "left",
                no_wrap=column in ("rule", "state"),
                overflow="fold",
            )
        for rule in rules:
            on = sorted(v for r, v in firing if r == rule.name)
            state = (
                Text(f"FIRING on v{', v'.join(map(str, on))}", style="bold red")
                if on
                else Text("ok", style="green")
            )
            table.add_row(
                Text(rule.name),
                f"{rule.metric} {rule.op} {rule.threshold:g}",
                "default" if rule.window is None else f"last {rule.window}",
                str(rule.min_samples),
                state,
            )
        parts.append(table)
    else:
        parts.append(
            Text(
                f"{name} has no alert rules; add one with: torchops alerts add {name} "
                "--metric accuracy --op '<' --threshold 0.9"
            )
        )
    if events:
        table = Table(title="Recent events (newest first)", title_justify="left")
        for column in ("time (UTC)", "rule", "version", "state", "value"):
            table.add_column(column, no_wrap=column != "rule", overflow="fold")
        for event in events:
            table.add_row(
                format_time(event.at).removesuffix(" UTC"),
                Text(event.rule),
                f"v{event.version}",
                Text(event.state, style="red" if event.state == "firing" else "green"),
                "-" if event.value is None else f"{event.value:.4g}",
            )
        parts.append(table)
    elif rules:
        parts.append(Text("no alert events yet"))
    return Group(*parts)
