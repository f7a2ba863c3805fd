"""Observation arrays in append-only segment files beside a SQLite database.

On a file-backed SQLite store, the writer appends each stored batch's outputs and inputs
(the same safetensors bytes that would otherwise be its ``outputs``/``inputs`` columns) to
its open segment file under ``<database directory>/observations/``; the batch's row holds
where they are (``segment``, ``segment_offset``, ``outputs_size``, ``inputs_size``). SQLite
in WAL mode writes every byte twice — into the WAL, then into the database when it
checkpoints — so the bulk of the bytes goes where it is written once (under the load of
``bench/monitor.py``, in same-run comparisons, the writer thread's CPU fell from 0.49-0.59
to 0.41-0.50 µs per request and the server's throughput rose by 1-2% of the unmonitored
server's). PostgreSQL keeps the bytes inline: its writers may be on other machines.

A segment file is ``MAGIC`` then records: the outputs' bytes and their CRC-32 (4 bytes,
little-endian), then, when the batch has inputs, the inputs' bytes and theirs. A record is
appended before the row that points at it commits. The file is synced (``fdatasync``)
every ``SYNC_INTERVAL_S`` and when sealed: when it reaches ``ROTATE_BYTES`` or
``ROTATE_AGE_S`` and the writer moves to a new one, or the writer closes. Like SQLite's
``synchronous=NORMAL``, a power loss can lose the last seconds; a process that dies loses
nothing (the bytes were in the kernel).

A writer holds an exclusive ``flock`` on its open segment. Whenever a writer opens a new
segment, it recovers the unsealed segments nobody holds (their writer died): rows whose
bytes are missing or fail their checksum are deleted, with their id index, and the
segment is sealed. A writer locks a new segment before listing it, so a listed segment
nobody holds is a dead writer's (a listed segment whose file is missing too: its
batches are deleted). Retention (``ObservationStore.apply_retention``) recovers the same
way, then deletes sealed segments that no row points at. A writer opening its first
segment, and retention, delete the files of writers that died between creating a segment
and listing it (unlisted, unlocked, ``UNLISTED_AGE_S`` old). A reader that finds a
segment's bytes missing or damaged (a file deleted by hand) raises ``ArtifactCorrupted``
naming the file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, exists, insert, select, update

from torchops.errors import ArtifactCorrupted
from torchops.monitoring import store
from torchops.monitoring.store import Piece
from torchops.registry.store import utcnow

__all__ = ["SegmentReader", "SegmentWriter", "segment_dir", "sweep"]

log = logging.getLogger(__name__)

MAGIC = b"torchops-observations-1\n"
#: a writer moves to a new segment once its file is this big ...
ROTATE_BYTES = 64 * 1024 * 1024
#: ... or this old (so retention by age can free whole files)
ROTATE_AGE_S = 3600.0
#: the open segment is synced at least this often while it is written
SYNC_INTERVAL_S = 5.0
#: an unlisted segment file this old that nobody locks is a dead writer's, and deleted
UNLISTED_AGE_S = 600.0
_CRC = 4


def segment_dir(engine: Engine) -> Path | None:
    """Where ``engine`` 's segment files go: beside a file-backed SQLite database; None for
    PostgreSQL and in-memory SQLite, which keep array bytes inline."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or engine.url.query.get("mode") == "memory":
        return None
    return Path(database).resolve().parent / "observations"


class SegmentWriter:
    """Appends records to one open segment at a time; used by one writer thread."""

    def __init__(self, engine: Engine, directory: Path) -> None:
        self.engine = engine
        self.directory = directory
        self._fd: int | None = None
        self._name = ""
        self._size = 0
        self._opened = 0.0
        self._synced = 0.0
        self._dirty = False
        self._swept = False

    @property
    def open(self) -> bool:
        """True when ``append`` has a segment to write to."""
        return self._fd is not None

    def ready(self) -> bool:
        """Open a segment, or a new one when the open one is full or old; call it outside
        any transaction (it writes the segments table). False (logged) when that failed:
        the caller keeps the bytes inline."""
        if (
            self._fd is not None
            and self._size < ROTATE_BYTES
            and time.monotonic() - self._opened < ROTATE_AGE_S
        ):
            return True
        try:
            self._rotate()
        except Exception:
            log.exception("could not open an observation segment in %s", self.directory)
        return self._fd is not None

    def append(self, outputs: Sequence[Piece], inputs: Sequence[Piece] | None) -> dict[str, Any]:
        """Append one batch's array bytes, each given as pieces to write one after another,
        to the open segment; the ``observation_batches`` values that point at them (with
        the inline columns emptied)."""
        if self._fd is None:
            raise RuntimeError("no open observation segment (call ready first)")
        parts = [*outputs, _crc(outputs)]
        if inputs is not None:
            parts += [*inputs, _crc(inputs)]
        offset = self._size
        try:
            _write_all(self._fd, parts)
        except OSError:
            os.ftruncate(self._fd, offset)  # no partial record for the next one to follow
            raise
        self._size = offset + _size(parts)
        self._dirty = True
        return {
            "segment": self._name,
            "segment_offset": offset,
            "outputs_size": _size(outputs),
            "inputs_size": None if inputs is None else _size(inputs),
            "outputs": b"",
            "inputs": None,
        }

    def tick(self) -> None:
        """Sync the open segment if it was written and not synced for ``SYNC_INTERVAL_S``."""
        due = time.monotonic() - self._synced >= SYNC_INTERVAL_S
        if self._fd is not None and self._dirty and due:
            self._sync()

    def close(self) -> None:
        """Seal the open segment (sync it, mark it sealed, let go of it)."""
        if self._fd is None:
            return
        fd, name = self._fd, self._name
        try:
            self._sync()
        finally:
            self._fd = None
            os.close(fd)  # lets go of the flock too
        with store.writer(self.engine).begin() as conn:
            segments = store.observation_segments
            conn.execute(update(segments).where(segments.c.name == name).values(sealed=True))

    def _sync(self) -> None:
        assert self._fd is not None
        os.fdatasync(self._fd)
        self._synced = time.monotonic()
        self._dirty = False

    def _rotate(self) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        recover(self.engine, self.directory)  # dead writers' segments, at every new one
        if not self._swept:  # files only a crash leaves: once per writer, which lists all
            _sweep_unlisted(self.engine, self.directory)
            self._swept = True
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(6)}.seg"
        path = self.directory / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        try:
            # locked before it is listed, so ``recover`` never takes a live writer's segment
            # for a dead one's; a crash before it is listed leaves a file nothing points at
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, [MAGIC])
            with store.writer(self.engine).begin() as conn:
                conn.execute(
                    insert(store.observation_segments).values(
                        name=name, created_at=utcnow(), sealed=False
                    )
                )
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._name, self._size = fd, name, len(MAGIC)
        self._opened = self._synced = time.monotonic()
        self._dirty = True


class SegmentReader:
    """Reads records back (thread-safe: each read opens the file)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def resolve(self, row: Mapping[str, Any], *, inputs: bool) -> dict[str, Any]:
        """``row`` with its ``outputs`` (and, if ``inputs``, ``inputs``) read from its
        segment; ``ArtifactCorrupted`` when they are missing or damaged."""
        name = row["segment"]
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ArtifactCorrupted(f"bad observation segment name {name!r}")
        path = self.directory / name
        parts = _parts(row["segment_offset"], row["outputs_size"], row["inputs_size"])
        parts = parts if inputs else parts[:1]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactCorrupted(
                f"observation segment {path} is missing (deleted by hand?): stored batch "
                f"{row['id']} cannot be read"
            ) from None
        try:
            found = [_checked(fd, at, length) for at, length in parts]
        finally:
            os.close(fd)
        if any(data is None for data in found):
            raise ArtifactCorrupted(
                f"observation segment {path}: the bytes of stored batch {row['id']} at offset "
                f"{parts[0][0]} are missing or damaged (was the file truncated or changed?)"
            )
        resolved = dict(row)
        resolved["outputs"] = found[0]
        resolved["inputs"] = found[1] if len(found) > 1 else None
        return resolved


def recover(engine: Engine, directory: Path) -> int:
    """Recover the unsealed segments no live writer holds; the batches deleted."""
    segments, b = store.observation_segments, store.observation_batches
    with engine.connect() as conn:
        names = list(
            conn.execute(select(segments.c.name).where(segments.c.sealed.is_(False))).scalars()
        )
    deleted = 0
    for name in names:
        path = directory / name
        try:
            fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None and not _take_lock(fd):
                continue  # a live writer's
            with engine.connect() as conn:
                rows = conn.execute(
                    select(b.c.id, b.c.segment_offset, b.c.outputs_size, b.c.inputs_size).where(
                        b.c.segment == name
                    )
                ).all()
            lost = [row.id for row in rows if fd is None or not _intact(fd, row)]
            if fd is not None:
                os.fdatasync(fd)
            with store.writer(engine).begin() as conn:
                if lost:
                    conn.execute(
                        delete(store.observation_ids).where(
                            store.observation_ids.c.batch_id.in_(lost)
                        )
                    )
                    conn.execute(delete(b).where(b.c.id.in_(lost)))
                if fd is None:
                    conn.execute(delete(segments).where(segments.c.name == name))
                else:
                    sealed = update(segments).where(segments.c.name == name).values(sealed=True)
                    conn.execute(sealed)
            if lost:
                log.warning(
                    "observation segment %s: %d stored batches lost their bytes (the machine "
                    "stopped before they reached the disk); deleted them",
                    path,
                    len(lost),
                )
            deleted += len(lost)
        finally:
            if fd is not None:
                os.close(fd)
    return deleted


def sweep(engine: Engine, directory: Path) -> int:
    """Recover dead writers' segments, then delete the sealed segments no stored batch
    points at, and the files of writers that died before listing them; the files
    deleted."""
    recover(engine, directory)
    segments, b = store.observation_segments, store.observation_batches
    unused = select(segments.c.name).where(
        segments.c.sealed.is_(True), ~exists().where(b.c.segment == segments.c.name)
    )
    with engine.connect() as conn:
        names = list(conn.execute(unused).scalars())
    for name in names:
        (directory / name).unlink(missing_ok=True)
        with store.writer(engine).begin() as conn:
            conn.execute(delete(segments).where(segments.c.name == name))
    return len(names) + _sweep_unlisted(engine, directory)


def _sweep_unlisted(engine: Engine, directory: Path) -> int:
    """Delete segment files that are not listed, older than ``UNLISTED_AGE_S`` and not
    locked: a writer that died between creating a segment and listing it left them (a
    live writer locks its new file first and lists it within moments)."""
    with engine.connect() as conn:
        listed = set(conn.execute(select(store.observation_segments.c.name)).scalars())
    deleted = 0
    for path in directory.glob("*.seg"):
        if path.name in listed:
            continue
        try:
            if time.time() - path.stat().st_mtime < UNLISTED_AGE_S:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if not _take_lock(fd):
                continue  # a live writer's, still being listed
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        log.warning("deleted observation segment %s: no stored batch knew of it", path)
        deleted += 1
    return deleted


def _take_lock(fd: int) -> bool:
    """Lock a segment file for this process; False when a live writer holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _parts(offset: int, outputs_size: int, inputs_size: int | None) -> list[tuple[int, int]]:
    """Where a record's outputs (and inputs, if it has them) are: ``(offset, size)`` s."""
    parts = [(int(offset), int(outputs_size))]
    if inputs_size is not None:
        parts.append((int(offset) + int(outputs_size) + _CRC, int(inputs_size)))
    return parts


def _intact(fd: int, row: Any) -> bool:
    parts = _parts(row.segment_offset, row.outputs_size, row.inputs_size)
    return all(_checked(fd, at, size) is not None for at, size in parts)


def _checked(fd: int, offset: int, size: int) -> bytes | None:
    """The ``size`` bytes at ``offset`` if they are all there and match their CRC-32."""
    data = os.pread(fd, size + _CRC, offset)
    if len(data) != size + _CRC or data[size:] != _crc([data[:size]]):
        return None
    return data[:size]


def _crc(pieces: Sequence[Piece]) -> bytes:
    """The CRC-32 of the pieces one after another, as the segment stores it."""
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return crc.to_bytes(_CRC, "little")


def _size(pieces: Sequence[Piece]) -> int:
    return sum(memoryview(p).nbytes for p in pieces)


def _write_all(fd: int, parts: list[Piece]) -> None:
    written = os.writev(fd, parts)
    total = _size(parts)
    if written < total:  # a short write (a signal, a full disk): write the rest
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]
