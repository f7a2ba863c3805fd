"""The ``torchops`` command: a typer app made of one module per command group."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from torchops import __version__
from torchops.cli import alerts, feedback, models, monitor, quickstart
from torchops.cli._common import CliGroup, GlobalOptions, HomeOption, RegistryUrlOption
from torchops.cli.learn import learn
from torchops.cli.rollback import rollback
from torchops.cli.serve import serve

__all__ = ["app", "main"]

app = typer.Typer(
    name="torchops",
    cls=CliGroup,
    help="Run trained PyTorch models in production and keep them healthy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _panel, _module in (("Getting started", quickstart), ("Registry", models)):
    for _name, _function in _module.COMMANDS.items():
        app.command(_name, rich_help_panel=_panel)(_function)
app.command("serve", rich_help_panel="Serving")(serve)
for _module in (monitor, feedback):
    for _name, _function in _module.COMMANDS.items():
        app.command(_name, rich_help_panel="Monitoring")(_function)
app.add_typer(alerts.app, name="alerts", rich_help_panel="Monitoring")
app.command("learn", rich_help_panel="Learning")(learn)
app.command("rollback", rich_help_panel="Learning")(rollback)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"torchops {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Run trained PyTorch models in production and keep them healthy."""
    ctx.obj = GlobalOptions(
        home=Path(home) if home is not None else None, registry_url=registry_url
    )


def main() -> None:
    """Entry point of the ``torchops`` console script."""
    app(prog_name="torchops")
