"""What every command shares: settings options, opening the registry, output, input files."""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from torchops.config import Settings
from torchops.errors import InvalidInput, TorchopsError
from torchops.types import FORMATS, Array

if TYPE_CHECKING:
    from torchops.registry import Registry

__all__ = [
    "CliGroup",
    "GlobalOptions",
    "HomeOption",
    "JsonOption",
    "RegistryUrlOption",
    "console",
    "fail",
    "format_bytes",
    "format_diff",
    "format_time",
    "load_arrays",
    "open_registry",
    "parse_formats",
    "parse_pairs",
    "parse_time",
    "print_json",
    "resolve_settings",
]

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        metavar="DIR",
        help="Folder torchops keeps its state in (env TORCHOPS_HOME; default ~/.torchops).",
        show_default=False,
    ),
]
RegistryUrlOption = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        metavar="URL",
        help="SQLAlchemy URL of the registry database "
        "(env TORCHOPS_REGISTRY_URL; default sqlite:///HOME/registry.db).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (the Python API's field names) instead.")
]


@dataclass(frozen=True, slots=True)
class GlobalOptions:
    """``--home`` / ``--registry-url`` given before the command name."""

    home: Path | None = None
    registry_url: str | None = None


def resolve_settings(
    ctx: typer.Context, home: Path | None = None, registry_url: str | None = None
) -> Settings:
    """Settings from the command's options, else the global ones, else the environment."""
    globals_ = _find_globals(ctx)
    settings = Settings.load(
        home=home if home is not None else globals_.home,
        registry_url=registry_url if registry_url is not None else globals_.registry_url,
    )
    if settings.home.exists() and not settings.home.is_dir():
        fail(f"the torchops home '{settings.home}' is a file, not a folder")
    return settings


def open_registry(settings: Settings) -> Registry:
    from torchops.registry import Registry

    return Registry(settings=settings)


def _find_globals(ctx: typer.Context) -> GlobalOptions:
    current: Any = ctx
    while current is not None:
        if isinstance(current.obj, GlobalOptions):
            return current.obj
        current = current.parent
    return GlobalOptions()


# -- output -----------------------------------------------------------------------------


def console() -> Console:
    """A console on the current stdout (created per command so test runners capture it)."""
    return Console(highlight=False, soft_wrap=False)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON; non-finite floats become null so the output always parses."""
    typer.echo(json.dumps(_finite(data), indent=2, default=str))


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {str(k): _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_time(at: datetime, *, short: bool = False) -> str:
    """UTC, to the minute in tables (``short``), to the second with the zone otherwise."""
    utc = at.astimezone(UTC)
    return utc.strftime("%Y-%m-%d %H:%M") if short else utc.strftime("%Y-%m-%d %H:%M:%S UTC")


def format_diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


# -- errors -----------------------------------------------------------------------------


def fail(message: str) -> NoReturn:
    """Stop the command with a one-line error (exit code 1)."""
    raise InvalidInput(message)


def _one_line(text: str, limit: int = 1000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class CliGroup(typer.core.TyperGroup):
    """Turns every error into one line on stderr and exit code 1.

    ``TorchopsError`` is the expected kind; anything else is reported as unexpected, with
    its traceback when ``TORCHOPS_DEBUG=1``. Usage errors stay typer's (exit code 2).
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise
        except TorchopsError as exc:
            _report(f"error: {_one_line(exc.message)}")
        except Exception as exc:
            _report(f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))}")


def _report(line: str) -> NoReturn:
    if os.environ.get("TORCHOPS_DEBUG") == "1":
        traceback.print_exc(file=sys.stderr)
    typer.echo(line, err=True)
    raise typer.Exit(1)


# -- input parsing ----------------------------------------------------------------------


def load_arrays(path: Path, what: str) -> Array | dict[str, Array]:
    """Load a ``.npy`` array or a ``.npz`` of named arrays; never unpickles."""
    import numpy as np

    if not path.is_file():
        fail(f"{what} file '{path}' not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        fail(f"{what} file '{path}' is not a .npy or .npz array file: {exc}")
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded as archive:
        try:
            arrays = {name: archive[name] for name in archive.files}
        except ValueError as exc:
            fail(f"{what} file '{path}' holds something other than plain arrays: {exc}")
    if not arrays:
        fail(f"{what} file '{path}' holds no arrays")
    return arrays


def parse_pairs(items: Iterable[str], what: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}``."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"invalid {what} {item!r}: expected KEY=VALUE")
        result[key.strip()] = value
    return result


def parse_formats(formats: Sequence[str] | None) -> tuple[str, ...]:
    """Validate ``--format`` values; none given means every format."""
    if not formats:
        return FORMATS
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        fail(f"unknown format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(formats))


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is read as UTC (the times torchops prints)."""
    try:
        at = datetime.fromisoformat(text.replace(" UTC", "").strip())
    except ValueError:
        fail(f"invalid time {text!r}: use ISO 8601, e.g. 2025-01-31T12:00:00Z")
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
