"""Registry commands: register, models, versions, show, alias, history, export, delete, gc."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from torchops.cli._common import (
    HomeOption,
    JsonOption,
    RegistryUrlOption,
    console,
    fail,
    format_bytes,
    load_arrays,
    open_registry,
    parse_formats,
    parse_pairs,
    parse_time,
    print_json,
    resolve_settings,
)
from torchops.cli.render import (
    alias_events_table,
    models_table,
    reports_table,
    version_view,
    versions_table,
)
from torchops.errors import Conflict
from torchops.refs import ModelRef, validate_name
from torchops.types import FORMATS, Task

__all__ = ["COMMANDS"]

TASKS: tuple[Task, ...] = ("classification", "regression", "other")
RefArgument = Annotated[
    str, typer.Argument(metavar="REF", help="NAME, NAME:VERSION or NAME@ALIAS.", show_default=False)
]
NameArgument = Annotated[str, typer.Argument(metavar="NAME", help="Model name.")]


def register(
    ctx: typer.Context,
    name: NameArgument,
    model_file: Annotated[
        Path, typer.Argument(metavar="MODEL_FILE", help="A TorchScript archive (torch.jit.save).")
    ],
    example: Annotated[
        Path,
        typer.Option(
            "--example",
            metavar="FILE.npy",
            help="Example input batch: a .npy array, or a .npz of arrays named like the inputs.",
        ),
    ],
    task: Annotated[
        str | None, typer.Option(help="classification, regression or other.", show_default=False)
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="Class labels in output order, comma-separated.", show_default=False),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE.npy",
            help="A sample of training inputs, kept as the reference for drift monitoring.",
            show_default=False,
        ),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option(metavar="KEY=VALUE", help="A tag; repeat for more.")
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=NUMBER", help="A metric, e.g. accuracy=0.97; repeat."),
    ] = None,
    description: Annotated[str | None, typer.Option(show_default=False)] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help=f"A format to record ({', '.join(FORMATS)}); repeat; default all.",
            show_default=False,
        ),
    ] = None,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Register a TorchScript model file as the next version of NAME."""
    from torchops.packaging import package_torchscript

    validate_name(name)
    if task is not None and task not in TASKS:
        fail(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    label_list = [s.strip() for s in labels.split(",")] if labels is not None else None
    if label_list is not None and not all(label_list):
        fail(f"invalid --labels {labels!r}: expected comma-separated, non-empty labels")
    tags = parse_pairs(tag or [], "tag")
    metrics = {
        key: _number(key, value) for key, value in parse_pairs(metric or [], "metric").items()
    }
    wanted = parse_formats(formats)
    if not model_file.is_file():
        fail(f"model file '{model_file}' not found")
    example_inputs = load_arrays(example, "example")
    reference_inputs = load_arrays(reference, "reference") if reference is not None else None
    settings = resolve_settings(ctx, home, registry_url)

    pkg = package_torchscript(
        model_file,
        example_inputs,
        formats=wanted,
        task=task,
        labels=label_list,
        reference=reference_inputs,
    )
    with open_registry(settings) as registry:
        mv = registry.register_package(
            name, pkg, metrics=metrics or None, tags=tags or None, description=description
        )
    if json_:
        print_json(mv.to_dict())
        return
    out = console()
    out.print(
        f"Registered [bold]{mv.name}:{mv.version}[/] ({mv.task}; formats {', '.join(mv.formats)})"
    )
    out.print(reports_table(pkg.reports))


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        fail(f"invalid metric {key}={value!r}: expected a number")


def models(
    ctx: typer.Context,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """List registered models."""
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        infos = registry.models()
    if json_:
        print_json([info.to_dict() for info in infos])
        return
    if not infos:
        console().print("No models registered yet (try: torchops quickstart).")
        return
    console().print(models_table(infos))


def versions(
    ctx: typer.Context,
    name: NameArgument,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """List the versions of a model."""
    validate_name(name)
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        found = registry.versions(name)
    if json_:
        print_json([mv.to_dict() for mv in found])
        return
    console().print(versions_table(name, found))


def show(
    ctx: typer.Context,
    ref: RefArgument,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Show one version: signature, task, formats, artifacts, metrics, aliases."""
    parsed = ModelRef.parse(ref)
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        mv = registry.get(parsed)
    if json_:
        print_json(mv.to_dict())
        return
    console().print(version_view(mv))


def alias(
    ctx: typer.Context,
    name: NameArgument,
    alias: Annotated[str, typer.Argument(metavar="ALIAS", help="Alias, e.g. production.")],
    version: Annotated[
        int | None,
        typer.Argument(metavar="VERSION", help="Version number to point the alias at."),
    ] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why, recorded in the history.", show_default=False)
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Remove the alias instead.")] = False,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Point ALIAS of model NAME at VERSION (or --remove it); the move is recorded."""
    validate_name(name)
    validate_name(alias, "alias")
    if remove and version is not None:
        fail("give either VERSION or --remove, not both")
    if not remove and version is None:
        fail("missing VERSION (or pass --remove to remove the alias)")
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        before = registry.aliases(name).get((name, alias))
        if version is None:
            registry.remove_alias(name, alias, reason=reason)
        else:
            registry.set_alias(name, alias, version, reason=reason)
        event = registry.history(name, alias)[-1]
    if json_:
        print_json(event.to_dict())  # the alias's latest move (an earlier one if nothing moved)
        return
    if version is not None and before == version:
        console().print(f"{name}@{alias} already points to v{version}; nothing recorded")
    elif event.to_version is None:
        console().print(f"Removed {name}@{alias} (was v{event.from_version})")
    else:
        was = f" (was v{event.from_version})" if event.from_version is not None else ""
        console().print(f"{name}@{alias} → v{event.to_version}{was}")


def history(
    ctx: typer.Context,
    name: NameArgument,
    alias: Annotated[str | None, typer.Option(help="Only this alias.", show_default=False)] = None,
    at: Annotated[
        str | None,
        typer.Option(
            metavar="TIME",
            help="Answer which version each alias pointed to at TIME (ISO 8601; UTC if no offset).",
            show_default=False,
        ),
    ] = None,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Show every move of the model's aliases: when, from, to, who and why."""
    validate_name(name)
    if alias is not None:
        validate_name(alias, "alias")
    when = parse_time(at) if at is not None else None
    answers: list[dict[str, Any]] = []
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        events = registry.history(name, alias)
        if when is not None:
            names = [alias] if alias is not None else sorted({e.alias for e in events})
            for each in names:
                version = registry.alias_at(name, each, when)
                answers.append(
                    {"name": name, "alias": each, "at": when.isoformat(), "version": version}
                )
    if when is None:
        if json_:
            print_json([e.to_dict() for e in events])
        else:
            console().print(alias_events_table(name, events))
        return
    if json_:
        print_json(answers)
        return
    out = console()
    if not answers:
        out.print(f"{name} has no aliases.")
    for answer in answers:
        pointed = answer["version"]
        target = f"v{pointed}" if pointed is not None else "nothing (not set)"
        out.print(f"{name}@{answer['alias']} pointed to {target} at {answer['at']}")


def export(
    ctx: typer.Context,
    ref: RefArgument,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", metavar="FORMAT", help=f"One of {', '.join(FORMATS)}.", show_default=False
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Also write the artifact to FILE.", show_default=False),
    ] = None,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Derive FORMAT for a version from its stored TorchScript (parity-checked) and record it."""
    parsed = ModelRef.parse(ref)
    (fmt,) = parse_formats([fmt])
    if output is not None and output.is_dir():
        fail(f"--output '{output}' is a directory; give a file name")
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        mv = registry.get(parsed)
        exact = f"{mv.name}:{mv.version}"
        report = registry.export(exact, fmt)
        if not report.ok:
            if not json_:
                console().print(reports_table([report], title=f"Export of {exact}"))
            fail(f"export of {exact} to {fmt} failed: {report.error}")
        written: str | None = None
        if output is not None:
            _write_file(output, registry.read_artifact(exact, fmt))
            written = str(output)
    if json_:
        print_json({**report.to_dict(), "output": written})
        return
    out = console()
    out.print(reports_table([report], title=f"Export of {exact}"))
    if written is not None:
        out.print(f"Wrote {fmt} of {exact} to {escape(written)}")


def _write_file(path: Path, data: bytes) -> None:
    if not path.parent.is_dir():
        fail(f"--output folder '{path.parent}' does not exist")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def delete(
    ctx: typer.Context,
    ref: RefArgument,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm deleting a whole model (a bare NAME).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Delete a version even if an alias points to it.")
    ] = False,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Delete a version (NAME:VERSION or NAME@ALIAS), or a whole model (NAME, needs --yes)."""
    parsed = ModelRef.parse(ref)
    whole = parsed.version is None and parsed.alias is None
    if whole and not yes:
        fail(f"deleting the whole model {parsed.name!r} and all its versions needs --yes")
    version: int | None = None
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        if not whole:
            version = registry.get(parsed).version
        target = parsed.name if version is None else f"{parsed.name}:{version}"
        try:
            registry.delete(target, force=force)
        except Conflict as exc:
            raise Conflict(f"{exc.message} (pass --force to delete it anyway)") from exc
    if json_:
        print_json({"name": parsed.name, "version": version})
        return
    console().print(f"Deleted {target}")


def gc(
    ctx: typer.Context,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Remove stored blobs that no version references any more."""
    with open_registry(resolve_settings(ctx, home, registry_url)) as registry:
        report = registry.gc()
    if json_:
        print_json(report.to_dict())
        return
    console().print(
        f"Removed {report.removed} unreferenced blobs ({format_bytes(report.freed_bytes)} freed)"
    )


COMMANDS: dict[str, Callable[..., Any]] = {
    "register": register,
    "models": models,
    "versions": versions,
    "show": show,
    "alias": alias,
    "history": history,
    "export": export,
    "delete": delete,
    "gc": gc,
}
