"""Reading stored observations back, one row at a time, joined with their feedback.

Observations are stored in batches (``torchops.monitoring._batches``); this module finds a
request id's batch and row — client-chosen ids through ``observation_ids``, generated ids
``<prefix>-<n>`` through each batch's ``id_lo``/``id_hi`` range — and turns stored rows
back into ``Observation`` s. A read cursor (``Page.cursor`` of ``observations``) is
``batch id << 20 | rows of that batch already read``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, func, select

from torchops.errors import ArtifactCorrupted, InvalidInput
from torchops.monitoring import store
from torchops.monitoring._batches import Batch, Observation, Page, stored_row_ids
from torchops.monitoring._capture import parse_generated
from torchops.monitoring._record import RowRule
from torchops.monitoring._segments import SegmentReader, segment_dir, sweep
from torchops.packaging import decode_arrays
from torchops.refs import validate_name
from torchops.registry.store import utcnow
from torchops.types import Array

__all__ = ["ObservationStore"]

#: rows of one batch a cursor can count (``MAX_STORED_ROWS`` is below it)
_ROW_BITS = 20
_ROW_MASK = (1 << _ROW_BITS) - 1
#: request ids looked up per query (well under SQLite's limit on parameters)
_CHUNK = 500
#: batches read per query when listing
_BATCHES_PER_QUERY = 16
#: rows deleted per transaction by retention, so writers are never locked out for long
_RETENTION_BATCHES = 64

#: where a stored row is: (batch id, row, version)
Location = tuple[int, int, int]


class ObservationStore:
    """Reads stored observations (joined with their feedback) and applies retention.

    ``join_grace_s``: feedback younger than this whose observation is not stored yet
    (it was still in a writer's buffer) holds the ``labelled`` cursor so it is not skipped;
    older unjoined feedback (its observation was dropped) no longer does. The last
    ``cache_batches`` decoded batches are kept for reads that come back to them.
    """

    def __init__(
        self, engine: Engine, *, join_grace_s: float = 60.0, cache_batches: int = 4
    ) -> None:
        self.engine = engine
        self.join_grace_s = join_grace_s
        self.cache_batches = cache_batches
        store.ensure_tables(engine)
        self.signatures = store.Signatures(engine)
        self._rules: dict[tuple[str, int], RowRule] = {}
        self._cache: OrderedDict[tuple[int, bool], Batch] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._segment_dir = segment_dir(engine)
        self._segments = None if self._segment_dir is None else SegmentReader(self._segment_dir)

    def __repr__(self) -> str:
        return f"ObservationStore({self.engine!r}, join_grace_s={self.join_grace_s})"

    # -- finding rows --------------------------------------------------------------------

    def locate(self, model: str, request_ids: Iterable[str]) -> dict[str, Location]:
        """``request id -> (batch id, row, version)`` of the given ids that are stored."""
        wanted = sorted({rid for rid in request_ids if isinstance(rid, str)})
        if not wanted:
            return {}
        validate_name(model)
        keys, b = store.observation_ids, store.observation_batches
        found: dict[str, Location] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), _CHUNK):
                query = select(
                    keys.c.request_id, keys.c.batch_id, keys.c.row, keys.c.version
                ).where(
                    keys.c.model == model, keys.c.request_id.in_(wanted[start : start + _CHUNK])
                )
                found.update({r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(query)})
            by_prefix: dict[str, dict[tuple[int, int], str]] = {}
            for rid in wanted:
                parsed = None if rid in found else parse_generated(rid)
                if parsed is not None:
                    by_prefix.setdefault(parsed[0], {})[(parsed[1], parsed[2])] = rid
            for prefix, ids in by_prefix.items():
                numbers = np.fromiter({n for n, _ in ids}, np.int64)
                query = (
                    select(b.c.id, b.c.version, b.c.ids)
                    .where(
                        b.c.model == model,
                        b.c.id_prefix == prefix,
                        # spans are below ID_SPAN: the index bounds the scan on both sides
                        b.c.id_lo > int(numbers.min()) - store.ID_SPAN,
                        b.c.id_lo <= int(numbers.max()),
                        b.c.id_hi >= int(numbers.min()),
                    )
                    .order_by(b.c.id)
                )
                for found_row in conn.execute(query):
                    batch_id, version = int(found_row[0]), int(found_row[1])
                    arrays = decode_arrays(found_row[2])
                    stored = arrays["numbers"]
                    parts = arrays.get("parts", np.full(stored.shape[0], -1, np.int32))
                    for row in np.flatnonzero(np.isin(stored, numbers)).tolist():
                        hit = ids.get((int(stored[row]), int(parts[row])))
                        if hit is not None and hit not in found:
                            found[hit] = (batch_id, row, version)
        return found

    def versions(self, model: str, request_ids: Iterable[str]) -> dict[str, int]:
        """``request id -> version`` of the given ids that are stored."""
        return {rid: loc[2] for rid, loc in self.locate(model, request_ids).items()}

    def get(self, model: str, request_id: str) -> Observation | None:
        """The observation ``request_id`` of ``model`` with its label, or None."""
        location = self.locate(model, [request_id]).get(request_id)
        if location is None:
            return None
        with self.engine.connect() as conn:
            batch = self._batches(conn, [location[0]], arrays=True)[location[0]]
            label = self._labels(conn, model, [request_id]).get(request_id)
        return batch.observation(location[1], label)

    # -- listing -------------------------------------------------------------------------

    def observations(
        self,
        model: str,
        version: int | None = None,
        *,
        since: datetime | None = None,
        since_id: int = 0,
        limit: int | None = None,
        arrays: bool = True,
    ) -> Page:
        """Observations of ``model`` in the order they were written, labelled or not.

        ``since``: only those made at or after that time; ``since_id``: a previous page's
        cursor; ``arrays=False`` skips decoding inputs and outputs (``outputs`` is then
        empty), which is all quality metrics need.
        """
        b = store.observation_batches
        limit = _limit(limit)
        first_batch, first_row = since_id >> _ROW_BITS, since_id & _ROW_MASK
        query = select(*b.c).where(b.c.model == validate_name(model), b.c.id >= first_batch)
        if version is not None:
            query = query.where(b.c.version == version)
        if since is not None:
            query = query.where(b.c.last_at >= since)
        cutoff = since.timestamp() if since is not None else None
        picked: list[tuple[Batch, int]] = []
        cursor = since_id
        with self.engine.connect() as conn:
            after = first_batch - 1
            while limit is None or len(picked) < limit:
                rows = conn.execute(
                    query.where(b.c.id > after).order_by(b.c.id).limit(_BATCHES_PER_QUERY)
                ).all()
                for row in rows:
                    batch = self._decode(row._mapping, arrays=arrays)
                    start = first_row if batch.id == first_batch else 0
                    for i in range(start, batch.rows):
                        if limit is not None and len(picked) >= limit:
                            break
                        if cutoff is None or batch.at[i] >= cutoff:
                            picked.append((batch, i))
                        cursor = (int(row.id) << _ROW_BITS) | (i + 1)
                    else:
                        continue
                    break
                if len(rows) < _BATCHES_PER_QUERY:
                    break
                after = int(rows[-1].id)
            labels = self._labels(conn, model, [batch.row_id(i) for batch, i in picked])
        result = []
        for batch, i in picked:
            rid = batch.row_id(i)
            result.append(batch.observation(i, labels.get(rid), arrays=arrays))
        return Page(result, cursor)

    def labelled(
        self,
        model: str,
        version: int | None = None,
        *,
        since_id: int = 0,
        limit: int | None = None,
        arrays: bool = True,
    ) -> Page:
        """Observations that have feedback, in the order the feedback arrived.

        Pass the returned cursor as ``since_id`` to read only what arrived since; feedback
        whose observation is still being written is returned on a later call, not skipped.
        """
        f = store.feedback
        query = (
            select(f.c.id, f.c.request_id, f.c.target, f.c.at)
            .where(f.c.model == validate_name(model), f.c.id > since_id)
            .order_by(f.c.id)
            .limit(_limit(limit))
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:  # the monitor asks every few polls, mostly to hear that nothing came
            return Page([], since_id)
        located = self.locate(model, [r.request_id for r in rows])
        needed = sorted(
            {loc[0] for loc in located.values() if version is None or loc[2] == version}
        )
        with self.engine.connect() as conn:
            batches = self._batches(conn, needed, arrays=arrays)
        recent = utcnow() - timedelta(seconds=self.join_grace_s)
        result: list[Observation] = []
        cursor = since_id
        for row in rows:
            location = located.get(row.request_id)
            if location is None:  # its observation is not stored (yet)
                if row.at > recent:
                    break
            elif version is None or location[2] == version:
                batch = batches[location[0]]
                result.append(batch.observation(location[1], row.target, arrays=arrays))
            cursor = int(row.id)
        return Page(result, cursor)

    def tail(self, model: str, version: int, rows: int) -> list[Batch]:
        """The newest stored batches of a version holding at least ``rows`` rows, oldest
        first (the first may hold older rows too)."""
        b = store.observation_batches
        query = (
            select(*b.c)
            .where(b.c.model == validate_name(model), b.c.version == version)
            .order_by(b.c.id.desc())
        )
        batches: list[Batch] = []
        total = 0
        with self.engine.connect() as conn:
            for row in conn.execute(query.execution_options(yield_per=_BATCHES_PER_QUERY)):
                batches.append(self._decode(row._mapping, arrays=True))
                total += batches[-1].rows
                if total >= rows:
                    break
        return batches[::-1]

    def latest_cursor(self, model: str) -> int:
        """The cursor after every observation of ``model`` stored so far."""
        b = store.observation_batches
        with self.engine.connect() as conn:
            row = conn.execute(
                select(b.c.id, b.c.rows)
                .where(b.c.model == validate_name(model))
                .order_by(b.c.id.desc())
                .limit(1)
            ).first()
        return 0 if row is None else (int(row[0]) << _ROW_BITS) | int(row[1])

    def count(self, model: str, version: int | None = None, *, labelled: bool = False) -> int:
        """How many observations of ``model`` are stored (only those with feedback)."""
        b, f = store.observation_batches, store.feedback
        validate_name(model)
        if labelled:
            with self.engine.connect() as conn:
                ids = list(conn.execute(select(f.c.request_id).where(f.c.model == model)).scalars())
            located = self.locate(model, ids)
            return sum(1 for loc in located.values() if version is None or loc[2] == version)
        query = select(func.coalesce(func.sum(b.c.rows), 0)).where(b.c.model == model)
        if version is not None:
            query = query.where(b.c.version == version)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # -- retention -----------------------------------------------------------------------

    def apply_retention(self, max_age: timedelta | None = None, max_rows: int | None = None) -> int:
        """Delete observations older than ``max_age`` and those beyond the newest
        ``max_rows`` of each model, with their feedback; returns how many were deleted.

        A stored batch whose rows are all past a limit is deleted whole; one with rows on
        both sides is rewritten without them (its arrays inline). Segment files no stored
        batch points at any more are deleted.
        """
        b = store.observation_batches
        deleted = 0
        if max_age is not None:
            if not isinstance(max_age, timedelta) or max_age <= timedelta(0):
                raise InvalidInput(f"max_age must be a positive timedelta, got {max_age!r}")
            cutoff = utcnow() - max_age
            with self.engine.connect() as conn:
                old = conn.execute(
                    select(b.c.id, b.c.last_at).where(b.c.first_at < cutoff).order_by(b.c.id)
                ).all()
            deleted += self._delete([int(r.id) for r in old if r.last_at < cutoff])
            seconds = cutoff.timestamp()
            for row in old:
                if row.last_at >= cutoff:  # rows on both sides of the cutoff
                    deleted += self._trim(int(row.id), lambda batch: batch.at >= seconds)
        if max_rows is not None:
            if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
                raise InvalidInput(f"max_rows must be an integer >= 0, got {max_rows!r}")
            with self.engine.connect() as conn:
                models = list(conn.execute(select(b.c.model).distinct()).scalars())
                doomed: list[int] = []
                trims: list[tuple[int, int]] = []
                for model in models:
                    kept = 0
                    query = select(b.c.id, b.c.rows).where(b.c.model == model)
                    for batch_id, rows in conn.execute(query.order_by(b.c.id.desc())).tuples():
                        if kept >= max_rows:
                            doomed.append(int(batch_id))
                        elif kept + rows > max_rows:
                            trims.append((int(batch_id), max_rows - kept))
                        kept += int(rows)
            deleted += self._delete(sorted(doomed))
            for batch_id, keep in trims:
                deleted += self._trim(batch_id, partial(_newest, keep=keep))
        if self._segment_dir is not None:
            sweep(self.engine, self._segment_dir)
        return deleted

    def _trim(self, batch_id: int, keep: Callable[[Batch], Array]) -> int:
        """Keep only the rows of a stored batch where ``keep(batch)`` is true; rows deleted."""
        b, keys, f = store.observation_batches, store.observation_ids, store.feedback
        with self.engine.connect() as conn:
            row = conn.execute(select(*b.c).where(b.c.id == batch_id)).first()
        if row is None:
            return 0
        batch = self._decode(row._mapping, arrays=True)
        mask = keep(batch)
        if mask.all():
            return 0
        if not mask.any():
            return self._delete([batch_id])
        gone = [batch.row_id(i) for i in np.flatnonzero(~mask).tolist()]
        trimmed = batch.keep(mask)
        trimmed.id = batch_id
        values = trimmed.encode(store.ArrayEncoder())
        values.update(segment=None, segment_offset=None, outputs_size=None, inputs_size=None)
        with store.writer(self.engine).begin() as conn:
            conn.execute(b.update().where(b.c.id == batch_id).values(**values))
            conn.execute(keys.delete().where(keys.c.batch_id == batch_id))
            key_rows = trimmed.key_rows()
            if key_rows:
                conn.execute(keys.insert(), key_rows)
            for at in range(0, len(gone), _CHUNK):
                conn.execute(
                    f.delete().where(
                        f.c.model == batch.model, f.c.request_id.in_(gone[at : at + _CHUNK])
                    )
                )
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == batch_id]:
                del self._cache[key]
        return len(gone)

    def _delete(self, batch_ids: Sequence[int]) -> int:
        """Delete these batches, their id index and their feedback; rows deleted."""
        b, keys, f = store.observation_batches, store.observation_ids, store.feedback
        total = 0
        for start in range(0, len(batch_ids), _RETENTION_BATCHES):
            chunk = list(batch_ids[start : start + _RETENTION_BATCHES])
            with self.engine.connect() as conn:
                stored = conn.execute(
                    select(b.c.id, b.c.model, b.c.id_prefix, b.c.ids, b.c.custom_ids).where(
                        b.c.id.in_(chunk)
                    )
                ).all()
            with store.writer(self.engine).begin() as conn:
                for row in stored:
                    ids = stored_row_ids(row.id_prefix, row.ids, row.custom_ids)
                    for at in range(0, len(ids), _CHUNK):
                        conn.execute(
                            f.delete().where(
                                f.c.model == row.model, f.c.request_id.in_(ids[at : at + _CHUNK])
                            )
                        )
                    total += len(ids)
                conn.execute(keys.delete().where(keys.c.batch_id.in_(chunk)))
                conn.execute(b.delete().where(b.c.id.in_(chunk)))
            with self._cache_lock:
                for key in [k for k in self._cache if k[0] in chunk]:
                    del self._cache[key]
        return total

    # -- helpers -------------------------------------------------------------------------

    def _batches(self, conn: Connection, ids: Sequence[int], *, arrays: bool) -> dict[int, Batch]:
        """Decoded batches by id (cached: a batch never changes once stored)."""
        result: dict[int, Batch] = {}
        missing: list[int] = []
        with self._cache_lock:
            for batch_id in ids:
                cached = self._cache.get((batch_id, arrays)) or self._cache.get((batch_id, True))
                if cached is None:
                    missing.append(batch_id)
                else:
                    result[batch_id] = cached
        b = store.observation_batches
        columns = [c for c in b.c if arrays or c.name != "inputs"]
        for start in range(0, len(missing), _BATCHES_PER_QUERY):
            chunk = missing[start : start + _BATCHES_PER_QUERY]
            for row in conn.execute(select(*columns).where(b.c.id.in_(chunk))):
                batch = self._decode(row._mapping, arrays=arrays)
                result[int(row.id)] = batch
                with self._cache_lock:
                    self._cache[(int(row.id), arrays)] = batch
                    while len(self._cache) > self.cache_batches:
                        self._cache.popitem(last=False)
        return result

    def _decode(self, row: Any, *, arrays: bool) -> Batch:
        """A stored batch, its predictions derived by its version's rule when not stored."""
        key = (row["model"], int(row["version"]))
        rule = self._rules.get(key)
        if rule is None:
            signature = self.signatures.get(*key)
            rule = RowRule(signature) if signature is not None else None
            if rule is not None:
                self._rules[key] = rule
        if row.get("segment") is not None:
            if self._segments is None:
                raise ArtifactCorrupted(
                    f"stored batch {row['id']} points at observation segment {row['segment']}, "
                    "but this database has no segment directory"
                )
            row = self._segments.resolve(row, inputs=arrays)
        return Batch.decode(row, arrays=arrays, rule=rule)

    def _labels(self, conn: Connection, model: str, request_ids: Sequence[str]) -> dict[str, Any]:
        f = store.feedback
        labels: dict[str, Any] = {}
        unique = sorted(set(request_ids))
        for start in range(0, len(unique), _CHUNK):
            query = select(f.c.request_id, f.c.target).where(
                f.c.model == model, f.c.request_id.in_(unique[start : start + _CHUNK])
            )
            labels.update({rid: target for rid, target in conn.execute(query)})
        return labels


def _newest(batch: Batch, keep: int) -> Array:
    mask = np.zeros(batch.rows, dtype=bool)
    mask[batch.rows - keep :] = True
    return mask


def _limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
    return limit
