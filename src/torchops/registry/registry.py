"""The model registry: models, versions, artifacts, aliases and their history."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select, union
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from torchops.config import Settings
from torchops.errors import Conflict, InvalidInput, NotFound
from torchops.refs import ModelRef, validate_name
from torchops.registry import _records as rec
from torchops.registry import store
from torchops.registry._catalog import Catalog
from torchops.registry.artifacts import ArtifactStore, sha256_hex
from torchops.types import FORMATS, Array, Inputs, ModelVersion, Task

if TYPE_CHECKING:
    import torch

    from torchops.packaging import ExportReport, Package
    from torchops.runtime import Runtime

__all__ = ["GcReport", "Registry"]

log = logging.getLogger(__name__)

#: a blob lease older than this belongs to a writer that died; gc may then remove the blob
LEASE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class GcReport:
    """What ``Registry.gc`` removed: unreferenced blobs and the bytes they held."""

    removed: int
    freed_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {"removed": self.removed, "freed_bytes": self.freed_bytes}


class _Lease:
    def __init__(self, token: str, digests: frozenset[str]) -> None:
        self.token = token
        self.digests = digests
        self.committed = False


class Registry(Catalog):
    """Versioned, verified models in a SQL database and a content-addressed blob store.

    ``Registry()`` keeps everything under ``$TORCHOPS_HOME`` (else ``~/.torchops``):
    ``registry.db`` (SQLite) and ``artifacts/``. ``url`` names another database
    (``postgresql+psycopg://user@host/db``) and ``artifacts`` another blob location (a
    folder or an fsspec URL such as ``s3://bucket/prefix``).
    """

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        url: str | None = None,
        artifacts: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.home = home
        self.url = url
        self.artifacts = artifacts
        overrides: dict[str, Any] = {"home": home, "registry_url": url, "artifact_url": artifacts}
        if settings is None:
            settings = Settings.load(**overrides)
        else:
            changes = {k: v for k, v in overrides.items() if v is not None}
            if "home" in changes:
                changes["home"] = Path(changes["home"]).expanduser()
            settings = settings.with_(**changes)
        self.settings = settings
        database_url = make_url(settings.database_url)
        if database_url.get_backend_name() == "sqlite" and database_url.database not in (
            None,
            "",
            ":memory:",
        ):
            Path(database_url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = store.connect(database_url)
        try:
            store.ensure_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        super().__init__(engine)
        self._blobs = ArtifactStore(settings.artifacts_location)

    def __repr__(self) -> str:
        url = make_url(self.settings.database_url).render_as_string(hide_password=True)
        return f"Registry(url={url!r}, artifacts={self.settings.artifacts_location!r})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connections; the registry can reconnect on next use."""
        self._engine.dispose()

    # -- registering -------------------------------------------------------------------

    def register(
        self,
        name: str,
        model: torch.nn.Module,
        example_inputs: Inputs | torch.Tensor | tuple[torch.Tensor, ...],
        *,
        formats: Sequence[str] = FORMATS,
        task: Task | None = None,
        labels: Sequence[str] | None = None,
        reference: Inputs | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        parent: int | None = None,
        source: str = "upload",
        actor: str | None = None,
    ) -> ModelVersion:
        """Export ``model`` (see ``torchops.packaging.package``) and register the result."""
        from torchops.packaging import package

        # fail on bad metadata before spending time on exports
        self._precheck(name, metrics, tags, description, parent, source, actor)
        pkg = package(
            model, example_inputs, formats=formats, task=task, labels=labels, reference=reference
        )
        return self.register_package(
            name,
            pkg,
            metrics=metrics,
            tags=tags,
            description=description,
            parent=parent,
            source=source,
            actor=actor,
        )

    def register_package(
        self,
        name: str,
        pkg: Package,
        *,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        parent: int | None = None,
        source: str = "upload",
        actor: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Store ``pkg``'s blobs, then create the version (and the model if new) at once.

        The version becomes visible in the one transaction that records it, after every
        blob is stored: a crash leaves no partial version, only blobs ``gc`` removes.
        With a reference sample and no ``profile``, the monitoring profile is built from
        it (``torchops.monitoring.profiles``) and stored as the ``profile`` artifact.
        """
        self._precheck(name, metrics, tags, description, parent, source, actor)
        blobs = rec.check_package(pkg)
        if "reference" in blobs and "profile" not in blobs:
            from torchops.monitoring.profiles import profile_from_artifacts

            blobs["profile"] = profile_from_artifacts(
                pkg.signature, blobs["torchscript"], blobs["reference"]
            )
        actor = rec.default_actor(actor)
        extra = rec.check_json(dict(details or {}), "details")
        version_details = rec.check_json(
            {
                **dict(pkg.details),
                **extra,
                "registered_by": actor,
                "reports": [report.to_dict() for report in pkg.reports],
            },
            "the package details",
        )
        parity = rec.artifact_details(pkg)
        digests = {kind: sha256_hex(data) for kind, data in blobs.items()}
        with self._lease(digests.values()) as lease:
            for data in blobs.values():
                self._blobs.put(data)
            with self._write() as conn:
                model = self._lock_model(conn, name, create=True)
                if parent is not None:
                    self._version_row(conn, model, parent, what="parent version")
                number = model.last_version + 1
                conn.execute(
                    store.models.update()
                    .where(store.models.c.id == model.id)
                    .values(last_version=number)
                )
                version_id: int = conn.execute(
                    store.versions.insert()
                    .values(
                        model_id=model.id,
                        version=number,
                        signature=pkg.signature.to_dict(),
                        source=source,
                        parent=parent,
                        description=description,
                        details=version_details,
                        created_at=store.utcnow(),
                    )
                    .returning(store.versions.c.id)
                ).scalar_one()
                conn.execute(
                    store.artifacts.insert(),
                    [
                        {
                            "version_id": version_id,
                            "kind": kind,
                            "sha256": digests[kind],
                            "size": len(data),
                            "details": parity.get(kind, {}),
                        }
                        for kind, data in blobs.items()
                    ],
                )
                self._merge_rows(conn, store.version_tags, "version_id", version_id, tags or {})
                self._merge_rows(conn, store.metrics, "version_id", version_id, metrics or {})
                lease.committed = True
                log.info("registered %s:%d", name, number)
        return self.get(ModelRef(name, version=number))

    def _precheck(
        self,
        name: str,
        metrics: Mapping[str, float] | None,
        tags: Mapping[str, str] | None,
        description: str | None,
        parent: int | None,
        source: str,
        actor: str | None,
    ) -> None:
        validate_name(name)
        rec.check_metrics(metrics, deletes=False)
        rec.check_tags(tags, deletes=False)
        rec.check_text(description, "description")
        rec.check_source(source)
        rec.default_actor(actor)
        if parent is not None:
            rec.check_version_number(parent, "parent version")
            self.get(ModelRef(name, version=parent))

    # -- reading artifacts and loading -------------------------------------------------

    def read_artifact(self, ref: str | ModelRef, kind: str) -> bytes:
        """The bytes of one artifact of a version, checked against its sha256."""
        return self._read_blob(self.get(ref), kind)

    def _read_blob(self, version: ModelVersion, kind: str) -> bytes:
        info = version.artifacts.get(kind)
        if info is None:
            have = ", ".join(version.artifacts) or "none"
            raise NotFound(
                f"model {version.name}:{version.version} has no {kind!r} artifact (it has: {have})"
            )
        return self._blobs.get(info.sha256, what=f"{kind} of {version.name}:{version.version}")

    def example(self, ref: str | ModelRef) -> dict[str, Array]:
        """The example inputs the version was registered with, by input name."""
        from torchops.packaging import decode_arrays

        return decode_arrays(self.read_artifact(ref, "example"))

    def reference(self, ref: str | ModelRef) -> dict[str, Array] | None:
        """The reference sample of training inputs, if one was registered."""
        from torchops.packaging import decode_arrays

        version = self.get(ref)
        if "reference" not in version.artifacts:
            return None
        return decode_arrays(self._read_blob(version, "reference"))

    def load(self, ref: str | ModelRef, format: str | None = None) -> Runtime:
        """A warmed ``Runtime`` for the version: ``format``, else the first recorded of
        torchscript, exported, onnx."""
        from torchops.runtime import load_runtime

        version = self.get(ref)
        if format is None:
            if not version.formats:
                raise NotFound(f"model {version.name}:{version.version} has no serving format")
            format = version.formats[0]
        elif format not in FORMATS:
            raise InvalidInput(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
        return load_runtime(format, self._read_blob(version, format), version.signature)

    def export(self, ref: str | ModelRef, format: str, *, actor: str | None = None) -> ExportReport:
        """Derive ``format`` from the stored TorchScript, check parity, record it if it passes.

        A format already recorded is not exported again: its stored parity figures come back.
        """
        from torchops.packaging import ExportReport, decode_arrays, export_format

        if format not in FORMATS:
            raise InvalidInput(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
        actor = rec.default_actor(actor)
        version = self.get(ref)
        existing = version.artifacts.get(format)
        if existing is not None:
            return ExportReport(
                format=format,
                ok=True,
                error=None,
                max_abs_diff=existing.details.get("max_abs_diff"),
                max_rel_diff=existing.details.get("max_rel_diff"),
                seconds=0.0,
                details={"already_recorded": True, "sha256": existing.sha256},
            )
        torchscript = self._read_blob(version, "torchscript")
        example = decode_arrays(self._read_blob(version, "example"))
        data, report = export_format(torchscript, version.signature, example, format)
        if data is None or not report.ok:
            return report
        digest = sha256_hex(data)
        details = rec.check_json(
            {
                "max_abs_diff": report.max_abs_diff,
                "max_rel_diff": report.max_rel_diff,
                "seconds": report.seconds,
                "exported_by": actor,
                "exported_at": store.utcnow().isoformat(),
            },
            "the export report",
        )
        with self._lease([digest]) as lease:
            self._blobs.put(data)
            try:
                with self._write() as conn:
                    model = self._lock_model(conn, version.name)
                    row = self._version_row(conn, model, version.version)
                    conn.execute(
                        store.artifacts.insert().values(
                            version_id=row.id,
                            kind=format,
                            sha256=digest,
                            size=len(data),
                            details=details,
                        )
                    )
                    lease.committed = True
            except IntegrityError:
                # another process recorded this format in the meantime: keep theirs
                pass
        return report

    # -- deleting and collecting -------------------------------------------------------

    def delete(self, ref: str | ModelRef, *, force: bool = False, actor: str | None = None) -> None:
        """Delete a version (``name:3``, ``name@alias``) or, for a bare name, the model.

        Refused with ``Conflict`` while aliases point at what would go, unless ``force``
        (the aliases are then removed and the removal recorded in their history). Blobs
        that nothing else references are freed.
        """
        parsed = ModelRef.parse(ref)
        actor = rec.default_actor(actor)
        with self._write() as conn:
            model = self._lock_model(conn, parsed.name)
            if parsed.version is None and parsed.alias is None:
                rows = list(
                    conn.execute(
                        select(store.versions).where(store.versions.c.model_id == model.id)
                    )
                )
                what = f"model {model.name!r}"
            else:
                number = self._resolve_number(conn, model, parsed)
                rows = [self._version_row(conn, model, number)]
                what = f"model {model.name}:{number}"
            numbers = [row.version for row in rows]
            query = select(store.aliases.c.alias, store.aliases.c.version).where(
                store.aliases.c.model_id == model.id
            )
            if parsed.version is not None or parsed.alias is not None:
                query = query.where(store.aliases.c.version.in_(numbers))
            pointing = list(conn.execute(query.order_by(store.aliases.c.alias)))
            if pointing and not force:
                names = ", ".join(f"{alias} -> {number}" for alias, number in pointing)
                raise Conflict(
                    f"cannot delete {what}: aliases point to it ({names}); move them "
                    "first or delete with force"
                )
            ids = [row.id for row in rows]
            digests = set(
                conn.execute(
                    select(store.artifacts.c.sha256).where(store.artifacts.c.version_id.in_(ids))
                ).scalars()
            )
            for alias, number in pointing:
                self._move_alias(conn, model, alias, number, None, actor, f"{what} deleted")
            for table in (store.artifacts, store.version_tags, store.metrics):
                conn.execute(table.delete().where(table.c.version_id.in_(ids)))
            conn.execute(store.versions.delete().where(store.versions.c.id.in_(ids)))
            if parsed.version is None and parsed.alias is None:
                for table in (store.aliases, store.alias_events, store.model_tags):
                    conn.execute(table.delete().where(table.c.model_id == model.id))
                conn.execute(store.models.delete().where(store.models.c.id == model.id))
        log.info("deleted %s", what)
        self._collect(digests)

    def gc(self) -> GcReport:
        """Remove blobs no version references (and leftovers of writers that died)."""
        stale = store.utcnow() - LEASE_TIMEOUT
        with self._write() as conn:
            conn.execute(store.uploads.delete().where(store.uploads.c.created_at < stale))
        self._blobs.remove_stale_temporaries(stale)
        removed, freed = self._collect(None)
        return GcReport(removed=removed, freed_bytes=freed)

    def _collect(self, candidates: set[str] | None) -> tuple[int, int]:
        """Delete those of ``candidates`` (None: every stored blob) nothing references."""
        if candidates is not None and not candidates:
            return 0, 0
        stale = store.utcnow() - LEASE_TIMEOUT
        removed = freed = 0
        with self._write() as conn:
            self._lock_blobs(conn)
            if candidates is None:
                candidates = {digest for digest, _ in self._blobs.blobs()}
            art, up = store.artifacts.c, store.uploads.c
            by_artifact = select(art.sha256)
            by_lease = select(up.sha256).where(up.created_at >= stale)
            if len(candidates) <= 500:
                by_artifact = by_artifact.where(art.sha256.in_(candidates))
                by_lease = by_lease.where(up.sha256.in_(candidates))
            # one statement, so one snapshot: a commit between two queries cannot hide a blob
            kept = set(conn.execute(union(by_artifact, by_lease)).scalars())
            for digest in sorted(candidates - kept):
                freed += self._blobs.delete(digest)
                removed += 1
        if removed:
            log.info("freed %d blobs (%d bytes)", removed, freed)
        return removed, freed

    @contextmanager
    def _lease(self, digests: Iterable[str]) -> Iterator[_Lease]:
        """Protect ``digests`` from collection while they are written and recorded.

        If the caller does not mark the lease committed, the blobs it wrote and nothing
        else references are removed again, so a failed registration changes nothing.
        """
        lease = _Lease(uuid.uuid4().hex, frozenset(digests))
        now = store.utcnow()
        with self._write() as conn:
            self._lock_blobs(conn)
            conn.execute(
                store.uploads.insert(),
                [{"lease": lease.token, "sha256": d, "created_at": now} for d in lease.digests],
            )
        try:
            yield lease
        finally:
            try:
                with self._write() as conn:
                    conn.execute(store.uploads.delete().where(store.uploads.c.lease == lease.token))
                if not lease.committed:
                    self._collect(set(lease.digests))
            except Exception:
                log.warning("could not release blob lease %s", lease.token, exc_info=True)

    def _lock_blobs(self, conn: Connection) -> None:
        conn.execute(
            select(store.meta.c.key).where(store.meta.c.key == store.BLOB_LOCK).with_for_update()
        )
