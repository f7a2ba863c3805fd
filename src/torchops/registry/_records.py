"""Input checks and row-to-record conversion for the registry."""

from __future__ import annotations

import getpass
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, select

from torchops.errors import InvalidInput
from torchops.registry import store
from torchops.types import AUX_KINDS, FORMATS, ArtifactInfo, ModelVersion, Signature

if TYPE_CHECKING:
    from torchops.packaging import Package

KINDS = frozenset((*FORMATS, *AUX_KINDS))


def default_actor(actor: str | None) -> str:
    """``actor`` if given, else the OS user name."""
    if actor is not None:
        if not isinstance(actor, str) or not actor.strip() or len(actor) > 256:
            raise InvalidInput(f"invalid actor {actor!r}: a non-empty string of at most 256")
        return actor
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def check_tags(tags: Mapping[str, str | None] | None, *, deletes: bool) -> dict[str, str | None]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise InvalidInput(f"tags must be a mapping of str to str, got {type(tags).__name__}")
    for key, value in tags.items():
        if not isinstance(key, str) or not key or len(key) > 256:
            raise InvalidInput(f"invalid tag key {key!r}: a non-empty string of at most 256")
        if value is None and deletes:
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"tag {key!r}: the value must be a string, got {value!r}")
    return dict(tags)


def check_metrics(
    metrics: Mapping[str, float | None] | None, *, deletes: bool
) -> dict[str, float | None]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidInput(f"metrics must be a mapping of str to number, got {metrics!r}")
    checked: dict[str, float | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key or len(key) > 256:
            raise InvalidInput(f"invalid metric name {key!r}: a non-empty string of at most 256")
        if value is None and deletes:
            checked[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"metric {key!r}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidInput(f"metric {key!r}: expected a finite number, got {value!r}")
        checked[key] = float(value)
    return checked


def check_text(value: str | None, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    return value


def check_version_number(version: object, what: str = "version") -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInput(f"invalid {what} {version!r}: versions are integers from 1")
    return version


def check_source(source: str) -> str:
    if not isinstance(source, str) or not source or len(source) > 64:
        raise InvalidInput(f"invalid source {source!r}: a non-empty string of at most 64")
    return source


def check_json(value: Any, what: str) -> Any:
    """``value`` if it round-trips through JSON unchanged in kind, else ``InvalidInput``."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} must be JSON-serialisable: {exc}") from None


def check_package(pkg: Package) -> dict[str, bytes]:
    """The package's blobs by kind, after checking it is complete and well formed."""
    if not isinstance(getattr(pkg, "signature", None), Signature):
        raise InvalidInput("the package has no Signature")
    blobs = getattr(pkg, "blobs", None)
    if not isinstance(blobs, Mapping) or not blobs:
        raise InvalidInput("the package holds no artifacts")
    for kind, data in blobs.items():
        if kind not in KINDS:
            known = ", ".join(sorted(KINDS))
            raise InvalidInput(f"unknown artifact kind {kind!r}: expected one of {known}")
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise InvalidInput(f"artifact {kind!r} must be non-empty bytes")
    if "torchscript" not in blobs:
        raise InvalidInput("the package has no 'torchscript' artifact (the trainable form)")
    return {kind: bytes(data) for kind, data in blobs.items()}


def artifact_details(pkg: Package) -> dict[str, dict[str, Any]]:
    """Per recorded format: how its parity check went (from the package's reports)."""
    found: dict[str, dict[str, Any]] = {}
    for report in pkg.reports:
        if report.ok and report.format in pkg.blobs:
            found[report.format] = {
                "max_abs_diff": report.max_abs_diff,
                "max_rel_diff": report.max_rel_diff,
                "seconds": report.seconds,
            }
    return found


def load_versions(
    conn: Connection, model: Row[Any], rows: Sequence[Row[Any]]
) -> list[ModelVersion]:
    """Build ``ModelVersion`` records for version rows of one model, four queries in all."""
    if not rows:
        return []
    ids = [row.id for row in rows]
    found: dict[int, dict[str, ArtifactInfo]] = defaultdict(dict)
    query = select(store.artifacts).where(store.artifacts.c.version_id.in_(ids))
    for a in conn.execute(query):
        found[a.version_id][a.kind] = ArtifactInfo(a.kind, a.sha256, int(a.size), dict(a.details))
    tags: dict[int, dict[str, str]] = defaultdict(dict)
    query = select(store.version_tags).where(store.version_tags.c.version_id.in_(ids))
    for t in conn.execute(query):
        tags[t.version_id][t.key] = t.value
    values: dict[int, dict[str, float]] = defaultdict(dict)
    query = select(store.metrics).where(store.metrics.c.version_id.in_(ids))
    for m in conn.execute(query):
        values[m.version_id][m.key] = float(m.value)
    pointed: dict[int, list[str]] = defaultdict(list)
    query = (
        select(store.aliases.c.alias, store.aliases.c.version)
        .where(store.aliases.c.model_id == model.id)
        .order_by(store.aliases.c.alias)
    )
    for alias, number in conn.execute(query):
        pointed[number].append(alias)
    return [
        ModelVersion(
            name=model.name,
            version=row.version,
            signature=Signature.from_dict(row.signature),
            artifacts=_ordered(found[row.id]),
            created_at=row.created_at,
            source=row.source,
            parent=row.parent,
            description=row.description,
            tags=dict(sorted(tags[row.id].items())),
            metrics=dict(sorted(values[row.id].items())),
            aliases=tuple(pointed[row.version]),
            details=dict(row.details),
        )
        for row in rows
    ]


def _ordered(found: dict[str, ArtifactInfo]) -> dict[str, ArtifactInfo]:
    order = [*FORMATS, *AUX_KINDS]

    def rank(kind: str) -> tuple[int, str]:
        return (order.index(kind) if kind in order else len(order), kind)

    return {kind: found[kind] for kind in sorted(found, key=rank)}
