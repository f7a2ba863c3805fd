"""Content-addressed blobs: a local folder by default, any fsspec URL (``s3://bucket/prefix``).

A blob lives at ``ROOT/sha256/ab/abcdef...`` named by the sha256 of its bytes. Writes go to
a temporary name under ``ROOT/tmp/`` and are renamed into place, so a reader never sees a
half-written blob; every read checks the sha256 again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from torchops.errors import ArtifactCorrupted, InvalidInput, NotFound

__all__ = ["ArtifactStore", "sha256_hex"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Blobs named by their sha256 under ``location`` (a path or an fsspec URL)."""

    def __init__(self, location: str) -> None:
        self.location = location
        try:
            fs, root = fsspec.core.url_to_fs(location)
        except (ValueError, ImportError) as exc:
            raise InvalidInput(f"unsupported artifact location {location!r}: {exc}") from None
        self._fs: Any = fs
        self._root: str = root.rstrip("/")
        self._local = isinstance(fs, LocalFileSystem)
        self._fs.makedirs(self._join("sha256"), exist_ok=True)
        self._fs.makedirs(self._join("tmp"), exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.location!r})"

    def _join(self, *parts: str) -> str:
        return "/".join((self._root, *parts))

    def path(self, sha256: str) -> str:
        """Where the blob ``sha256`` lives in the store's file system."""
        if not _SHA256.fullmatch(sha256):
            raise InvalidInput(f"{sha256!r} is not a sha256 hex digest")
        return self._join("sha256", sha256[:2], sha256)

    def exists(self, sha256: str) -> bool:
        return bool(self._fs.exists(self.path(sha256)))

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its sha256. A blob already stored intact is kept."""
        digest = sha256_hex(data)
        target = self.path(digest)
        if self._intact(target, digest):
            return digest
        tmp = self._join("tmp", f"{digest}.{uuid.uuid4().hex}")
        try:
            if self._local:
                _write_local(tmp, target, data)
            else:
                self._fs.pipe_file(tmp, data)
                self._fs.makedirs(self._join("sha256", digest[:2]), exist_ok=True)
                self._fs.mv(tmp, target)
        except BaseException:
            self._discard(tmp)
            raise
        return digest

    def get(self, sha256: str, *, what: str | None = None) -> bytes:
        """The bytes of blob ``sha256``, checked; ``what`` names its owner in errors."""
        owner = f" ({what})" if what else ""
        try:
            data: bytes = self._fs.cat_file(self.path(sha256))
        except FileNotFoundError:
            raise ArtifactCorrupted(
                f"blob {sha256}{owner} is missing from the artifact store {self.location}"
            ) from None
        actual = sha256_hex(data)
        if actual != sha256:
            raise ArtifactCorrupted(
                f"blob {sha256}{owner} is corrupted: its bytes hash to {actual} "
                f"(in {self.location})"
            )
        return data

    def size(self, sha256: str) -> int:
        try:
            return int(self._fs.size(self.path(sha256)))
        except FileNotFoundError:
            raise NotFound(f"no blob {sha256} in {self.location}") from None

    def delete(self, sha256: str) -> int:
        """Remove a blob; returns the bytes freed (0 if it was not there)."""
        path = self.path(sha256)
        try:
            size = int(self._fs.size(path))
            self._fs.rm_file(path)
        except FileNotFoundError:
            return 0
        return size

    def blobs(self) -> Iterator[tuple[str, int]]:
        """Every stored blob as ``(sha256, size)``."""
        found: dict[str, dict[str, Any]] = self._fs.find(self._join("sha256"), detail=True)
        for path, info in found.items():
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if _SHA256.fullmatch(name):
                yield name, int(info.get("size") or 0)

    def remove_stale_temporaries(self, older_than: datetime) -> int:
        """Delete temporary files left by writers that died before ``older_than``."""
        removed = 0
        found: dict[str, dict[str, Any]] = self._fs.find(self._join("tmp"), detail=True)
        for path, info in found.items():
            modified = _modified(info)
            if modified is not None and modified < older_than:
                self._discard(path)
                removed += 1
        return removed

    def _intact(self, path: str, digest: str) -> bool:
        try:
            return sha256_hex(self._fs.cat_file(path)) == digest
        except FileNotFoundError:
            return False

    def _discard(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(path)


def _write_local(tmp: str, target: str, data: bytes) -> None:
    # durable before visible: a power cut must not leave a renamed but empty blob
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(tmp, target)


def _modified(info: dict[str, Any]) -> datetime | None:
    stamp = info.get("mtime", info.get("created"))
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    if isinstance(stamp, int | float):
        return datetime.fromtimestamp(stamp, UTC)
    return None
