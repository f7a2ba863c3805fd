"""``torchops rollback``: move an alias back to the version before, and say why."""

from __future__ import annotations

from typing import Annotated

import typer

from torchops.cli._common import (
    HomeOption,
    JsonOption,
    RegistryUrlOption,
    console,
    open_registry,
    print_json,
    resolve_settings,
)

__all__ = ["rollback"]


def rollback(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    alias: Annotated[str, typer.Option(help="The alias to move back.")] = "production",
    to: Annotated[
        int | None,
        typer.Option(
            metavar="VERSION",
            help="Version to move to (default: the previous one in the alias's history, "
            "skipping versions already rolled back).",
            show_default=False,
        ),
    ] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why, recorded in the history.", show_default=False)
    ] = None,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Move ALIAS of NAME back and mark the version it leaves rolled_back=true."""
    from torchops.learning.referee import rollback as roll_back

    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        left, now = roll_back(registry, name, alias=alias, to=to, reason=reason)
        event = registry.history(name, alias)[-1]
    if json_:
        print_json(event.to_dict())
        return
    console().print(
        f"{name}@{alias}: v{left} → v{now}; v{left} marked rolled_back=true ({event.reason})"
    )
