"""``torchops feedback NAME FILE``: labels for served predictions, from a CSV or Parquet file.

The file has an ``id`` column (the request id of the prediction, as the server answered
it) and a ``target`` column. With ``--url`` the labels go to a running server's feedback
route; without, straight into the registry database, where the server's observations are.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from torchops.cli._common import (
    HomeOption,
    JsonOption,
    RegistryUrlOption,
    console,
    fail,
    open_registry,
    print_json,
    resolve_settings,
)
from torchops.refs import validate_name

if TYPE_CHECKING:
    from torchops.config import Settings
    from torchops.monitoring.feedback import FeedbackResult

__all__ = ["COMMANDS", "read_feedback"]

#: errors listed in the terminal output (``--json`` lists them all)
SHOWN_ERRORS = 5
_COLUMNS = ("id", "target")


def feedback(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Model name.")],
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="CSV or Parquet file with columns id,target.", show_default=False
        ),
    ],
    url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Send to this running server (e.g. http://127.0.0.1:8000) instead of writing "
            "to the registry database.",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            metavar="TOKEN",
            help="The server's bearer token (default: env TORCHOPS_TOKEN, else HOME/token).",
            show_default=False,
        ),
    ] = None,
    by_label: Annotated[
        bool,
        typer.Option(
            "--by-label",
            help="Read every target as a class label, even one that looks like a number.",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Items per request or transaction.")
    ] = 1000,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    json_: JsonOption = False,
) -> None:
    """Send labels (id,target) for a model's predictions; exit 1 if any is rejected."""
    validate_name(name)
    items = read_feedback(file, by_label=by_label)
    settings = resolve_settings(ctx, home, registry_url)
    if url is not None:
        result = _send(settings, name, items, url, token, batch_size)
    else:
        result = _store(settings, name, items, batch_size)
    errors = [
        {"row": index + 1, "id": items[index][0], "error": message}
        for index, message in result.errors
    ]
    if json_:
        print_json({"accepted": result.accepted, "rejected": len(errors), "errors": errors})
    else:
        out = console()
        where = url if url is not None else "the registry database"
        style = "red" if errors else "green"
        out.print(
            Text(
                f"{name}: accepted {result.accepted}, rejected {len(errors)} of {len(items)} "
                f"labels ({where})",
                style=style,
            )
        )
        for error in errors[:SHOWN_ERRORS]:
            out.print(Text(f"  row {error['row']} (id {error['id']!r}): {error['error']}"))
        if len(errors) > SHOWN_ERRORS:
            out.print(Text(f"  … and {len(errors) - SHOWN_ERRORS} more (--json lists them all)"))
    if errors:
        raise typer.Exit(1)


def _send(
    settings: Settings,
    name: str,
    items: Sequence[tuple[str, Any]],
    url: str,
    token: str | None,
    batch_size: int,
) -> FeedbackResult:
    from torchops.monitoring.client import FeedbackClient

    with FeedbackClient(url, _token(settings, token), batch_size=batch_size) as client:
        return client.send_many(name, items)


def _token(settings: Settings, given: str | None) -> str | None:
    if given:
        return given
    if settings.token:  # TORCHOPS_TOKEN
        return settings.token
    path = settings.token_path
    return path.read_text().strip() if path.is_file() else None


def _store(
    settings: Settings, name: str, items: Sequence[tuple[str, Any]], batch_size: int
) -> FeedbackResult:
    from torchops.monitoring.feedback import FeedbackResult, FeedbackStore

    with open_registry(settings) as registry:
        registry.get_model(name)  # NotFound naming the model, rather than one error per row
        store = FeedbackStore(registry.engine)
        accepted = 0
        errors: list[tuple[int, str]] = []
        for start in range(0, len(items), batch_size):
            part = store.add_many(name, items[start : start + batch_size], source="cli")
            accepted += part.accepted
            errors.extend((start + index, message) for index, message in part.errors)
    return FeedbackResult(accepted, errors)


# -- reading ----------------------------------------------------------------------------


def read_feedback(path: Path, *, by_label: bool = False) -> list[tuple[str, Any]]:
    """``(request id, target)`` pairs from a CSV or Parquet file with columns id,target.

    CSV cells hold text: a target that reads as a JSON number or list is a class index
    or a regression target; anything else (or everything, with ``by_label``) is a label.
    """
    if not path.is_file():
        fail(f"feedback file '{path}' not found")
    with path.open("rb") as handle:
        parquet = handle.read(4) == b"PAR1"
    ids, targets = _read_parquet(path) if parquet else _read_csv(path, by_label)
    if by_label and parquet:
        targets = [t if t is None or isinstance(t, str) else str(t) for t in targets]
    if not ids:
        fail(f"feedback file '{path}' has no rows")
    return [(_id(v), t) for v, t in zip(ids, targets, strict=True)]


def _id(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value)


def _read_csv(path: Path, by_label: bool) -> tuple[list[Any], list[Any]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            _check_columns(path, reader.fieldnames or [])
            rows = [(row["id"], row["target"]) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        fail(f"feedback file '{path}' is not a readable CSV file: {exc}")
    ids = [(rid or "").strip() for rid, _ in rows]
    targets = [_cell((t or "").strip(), by_label) for _, t in rows]
    return ids, targets


def _cell(text: str, by_label: bool) -> Any:
    if by_label:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return value if is_number or isinstance(value, list) else text


def _read_parquet(path: Path) -> tuple[list[Any], list[Any]]:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        fail(f"feedback file '{path}' is not a readable Parquet file: {exc}")
    _check_columns(path, table.column_names)
    return table.column("id").to_pylist(), table.column("target").to_pylist()


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    missing = [c for c in _COLUMNS if c not in columns]
    if missing:
        fail(
            f"feedback file '{path}' needs columns id and target; it has "
            f"{', '.join(map(repr, columns)) or 'none'}"
        )


COMMANDS: dict[str, Callable[..., Any]] = {"feedback": feedback}
