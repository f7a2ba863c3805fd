"""``torchops quickstart``: the guided tour, end to end."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from torchops.cli._common import HomeOption, RegistryUrlOption, console, resolve_settings

__all__ = ["COMMANDS"]


def quickstart(
    ctx: typer.Context,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed for the split, initial weights and batches.")] = 0,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve/--no-serve",
            help="Start the inference server on a free loopback port and send it requests "
            "(--no-serve: skip that and the steps that need the server).",
        ),
    ] = True,
) -> None:
    """Train a classifier on scikit-learn's digits, register it in every format, promote it,
    serve it and send it the test set."""
    from torchops.quickstart import QuickstartConfig, run_quickstart

    settings = resolve_settings(ctx, home, registry_url)
    run_quickstart(
        settings,
        QuickstartConfig(epochs=epochs, seed=seed, serve=serve),
        console=console(),
        command=_program(),
    )


def _program() -> str:
    """``torchops`` if that is on PATH, else the path this process was started as."""
    started = Path(sys.argv[0])
    on_path = shutil.which("torchops")
    if started.name != "torchops" or (on_path and Path(on_path).resolve() == started.resolve()):
        return "torchops"
    return str(started)


COMMANDS: dict[str, Callable[..., Any]] = {"quickstart": quickstart}
