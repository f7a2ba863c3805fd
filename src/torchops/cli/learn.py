"""``torchops learn``: online learning from labelled feedback, in the foreground."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from torchops.cli._common import (
    HomeOption,
    JsonOption,
    RegistryUrlOption,
    console,
    fail,
    open_registry,
    parse_formats,
    print_json,
    resolve_settings,
)

if TYPE_CHECKING:
    from rich.console import Console

    from torchops.learning.learner import Learner
    from torchops.learning.referee import StepReport

__all__ = ["learn"]


def learn(
    ctx: typer.Context,
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF", help="NAME or NAME@ALIAS (default alias production) to learn."
        ),
    ],
    update_every: Annotated[
        int, typer.Option(min=1, help="Train a challenger every N new labels.")
    ] = 50,
    update_seconds: Annotated[
        float | None,
        typer.Option(
            metavar="S", help="Also train after S seconds with new labels.", show_default=False
        ),
    ] = None,
    optimizer: Annotated[str, typer.Option(help="sgd or adam.")] = "adam",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-3,
    steps: Annotated[int, typer.Option(min=1, help="Training steps per update.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per training step.")] = 64,
    weight_decay: Annotated[float, typer.Option(help="The optimizer's weight decay.")] = 0.0,
    l2_pull: Annotated[
        float,
        typer.Option(
            help="Pull toward the champion's weights: l2_pull * ||theta - theta_champion||^2."
        ),
    ] = 0.0,
    min_gain: Annotated[
        float, typer.Option(help="Relative gain a challenger needs, (new - old) / old.")
    ] = 0.01,
    min_samples: Annotated[
        int, typer.Option(min=1, help="Held-out labels per look of the gate.")
    ] = 100,
    alpha: Annotated[float, typer.Option(help="Significance level, split over the looks.")] = 0.05,
    looks: Annotated[int, typer.Option(min=1, help="Looks before a challenger is refused.")] = 3,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="Also export challengers to this format (exported, onnx); repeat.",
            show_default=False,
        ),
    ] = None,
    shadow: Annotated[
        bool, typer.Option("--shadow", help="Challengers also answer logged live traffic.")
    ] = False,
    once: Annotated[
        bool, typer.Option("--once", help="Consume the labels there are now, then exit.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between looks for new labels.")] = 1.0,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Learn REF from its labelled feedback: train, gate, promote, guard (Ctrl-C stops)."""
    from torchops.learning.gate import GateConfig
    from torchops.learning.learner import DEFAULT_GATE, DEFAULT_TRAIN, Learner
    from torchops.learning.trainer import TrainConfig
    from torchops.refs import ModelRef

    parsed = ModelRef.parse(ref)
    if parsed.version is not None:
        fail(f"learning follows an alias, not a version: {ref!r} (try {parsed.name}@production)")
    if optimizer not in ("sgd", "adam"):
        fail(f"unknown optimizer {optimizer!r}: choose sgd or adam")
    if interval <= 0:
        fail(f"--interval must be positive, got {interval}")
    extra = parse_formats(formats) if formats else ()
    train = TrainConfig(
        optimizer="sgd" if optimizer == "sgd" else "adam",
        lr=lr,
        weight_decay=weight_decay,
        l2_pull=l2_pull,
        steps=steps,
        batch_size=batch_size,
        seed=DEFAULT_TRAIN.seed,
    )
    gate = GateConfig(
        min_gain=min_gain,
        min_samples=min_samples,
        alpha=alpha,
        min_retention=DEFAULT_GATE.min_retention,
    )
    settings = resolve_settings(ctx, home, registry_url)
    out = console()
    with open_registry(settings) as registry:
        learner = Learner(
            registry,
            parsed.name,
            alias=parsed.alias or "production",
            update_every=update_every,
            update_seconds=update_seconds,
            train=train,
            gate=gate,
            looks=looks,
            formats=extra,
            shadow=shadow,
        )
        try:
            if once:
                report = learner.step()
                status = learner.status()
            else:
                report, status = _follow(learner, interval, out, json_)
        finally:
            learner.close()
    if json_:
        print_json({"report": report.to_dict(), "status": status} if once else status)
        return
    if once:
        _print_events(out, report)
    out.print(_status_table(status))


def _follow(
    learner: Learner, interval: float, out: Console, json_: bool
) -> tuple[StepReport, dict[str, Any]]:
    """Step until SIGINT/SIGTERM, printing what happens; returns the last report."""
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    if not json_:
        out.print(f"learning {learner.model}@{learner.alias}; Ctrl-C to stop")
    try:
        while True:
            report = learner.step()
            if not json_:
                _print_events(out, report)
            if stop.wait(interval):
                return report, learner.status()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _print_events(out: Console, report: StepReport) -> None:
    for event in report.events:
        when = event.at.strftime("%H:%M:%S")
        out.print(f"{when} {event.kind:<11} v{event.version}: {escape(event.message)}")
    if report.rejected or report.skipped:
        out.print(
            f"refused {report.rejected} rows (NaN/inf or out of range), "
            f"{report.skipped} without stored inputs"
        )


def _status_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"{status['model']}@{status['alias']}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    if not status.get("started"):
        table.add_row("state", "waiting for the alias to exist")
        return table
    served = status["served"]
    table.add_row("champion", f"v{status['champion']}")
    table.add_row(
        "labels",
        f"{status['labels']} accepted, {status['rejected']} refused, "
        f"{status['skipped']} without inputs; {status['since_update']} since the last update",
    )
    table.add_row("challengers registered", str(status["updates"]))
    pending = ", ".join(
        f"v{p['version']} ({p['held_out']} held-out labels, {p['looks']} looks)"
        for p in status["pending"]
    )
    table.add_row("pending", pending or "-")
    watch = status["watch"]
    table.add_row("guarding", f"v{watch['version']} vs v{watch['against']}" if watch else "-")
    metric = served["metric"]
    for version, numbers in sorted(served["by_version"].items(), key=lambda kv: int(kv[0])):
        table.add_row(
            f"served by v{version}", f"{metric} {numbers[metric]:.3f} on {numbers['labels']} labels"
        )
    return table
