"""Where a learner keeps its place: one row per ``(model, alias)`` and the lease on it.

The row holds the learner's cursor in the feedback stream and its counters as JSON, so
a restarted learner resumes where the last one stopped. ``owner`` and ``heartbeat`` are
a lease: a second learner for the same model and alias (``torchops learn`` beside
``serve --learn``, or two server workers) is refused while the first one is alive, and
takes over once its heartbeat is older than ``lease_s``.

The table lives on its own ``MetaData`` in the registry's database, created on first use
like the monitoring tables.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from sqlalchemy import Column, Engine, MetaData, String, Table, select, text
from sqlalchemy.exc import IntegrityError

from torchops.errors import Conflict, InvalidInput
from torchops.monitoring import store as monitoring_store
from torchops.registry import store as registry_store
from torchops.registry.store import Json, UTCDateTime, utcnow

__all__ = [
    "LearnerState",
    "Place",
    "ensure_table",
    "feedback_before",
    "feedback_ids",
    "learner_state",
    "metadata",
    "new_owner",
]

#: distinct from the registry's and the monitoring tables' advisory lock keys
_ADVISORY_LOCK = 7260516

metadata = MetaData()

learner_state = Table(
    "learner_state",
    metadata,
    Column("model", String(128), primary_key=True),
    Column("alias", String(128), primary_key=True),
    Column("state", Json, nullable=False),
    Column("owner", String(256)),
    Column("heartbeat", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
)


@dataclass
class Place:
    """Where a learner is in the feedback stream and what it counted (stored as JSON).

    ``cursor``: the last feedback id consumed; ``since_update``: labels accepted since the
    last update, the first of them ``first_new``; ``labels``/``rejected``/``skipped``:
    rows accepted, refused by the buffer, without stored inputs; ``updates``: challengers
    registered.
    """

    cursor: int = 0
    since_update: int = 0
    first_new: int | None = None
    labels: int = 0
    rejected: int = 0
    skipped: int = 0
    updates: int = 0

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Place:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


_ready: weakref.WeakSet[Engine] = weakref.WeakSet()
_ready_lock = threading.Lock()


def _writer(engine: Engine) -> Engine:
    return engine.execution_options(**{registry_store.WRITE: True})


def ensure_table(engine: Engine) -> None:
    """Create ``learner_state`` if it is missing; cheap after the first call per engine."""
    with _ready_lock:
        if engine in _ready:
            return
        with _writer(engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})"))
            metadata.create_all(conn)
        _ready.add(engine)


def new_owner() -> str:
    """A name for this learner instance: host, process and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LearnerState:
    """The stored state of the learner of ``model@alias`` and this instance's lease on it."""

    def __init__(self, engine: Engine, model: str, alias: str, *, lease_s: float = 120.0) -> None:
        if not lease_s > 0:
            raise InvalidInput(f"lease_s must be positive, got {lease_s}")
        self.engine = engine
        self.model = model
        self.alias = alias
        self.lease_s = lease_s
        self.owner = new_owner()
        ensure_table(engine)

    def _key(self) -> Any:
        t = learner_state
        return (t.c.model == self.model) & (t.c.alias == self.alias)

    def acquire(self) -> dict[str, Any]:
        """Take the lease and return the stored state (empty on the first run).

        Conflict when another learner holds a live lease on the same model and alias.
        """
        t = learner_state
        now = utcnow()
        try:
            with _writer(self.engine).begin() as conn:
                query = select(t.c.state, t.c.owner, t.c.heartbeat).where(self._key())
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update()
                row = conn.execute(query).first()
                if row is None:
                    conn.execute(
                        t.insert().values(
                            model=self.model,
                            alias=self.alias,
                            state={},
                            owner=self.owner,
                            heartbeat=now,
                            updated_at=now,
                        )
                    )
                    return {}
                alive = row.heartbeat is not None and row.heartbeat > now - timedelta(
                    seconds=self.lease_s
                )
                if row.owner not in (None, self.owner) and alive:
                    raise Conflict(
                        f"another learner ({row.owner}) is already learning "
                        f"{self.model}@{self.alias} (last heartbeat "
                        f"{row.heartbeat.isoformat(timespec='seconds')}); stop it first, or "
                        f"wait {self.lease_s:.0f} s after it died"
                    )
                conn.execute(t.update().where(self._key()).values(owner=self.owner, heartbeat=now))
                return dict(row.state or {})
        except IntegrityError:  # another learner inserted the row at the same moment
            raise Conflict(
                f"another learner started learning {self.model}@{self.alias} at the same time"
            ) from None

    def save(self, state: dict[str, Any]) -> None:
        """Store ``state`` and renew the lease; Conflict if another learner took it over."""
        t = learner_state
        now = utcnow()
        with _writer(self.engine).begin() as conn:
            done = conn.execute(
                t.update()
                .where(self._key(), t.c.owner == self.owner)
                .values(state=state, heartbeat=now, updated_at=now)
            ).rowcount
        if done != 1:
            raise Conflict(
                f"the learner of {self.model}@{self.alias} lost its lease (another learner "
                "took over after a missed heartbeat); stopping"
            )

    def release(self) -> None:
        """Give up the lease so another learner may start at once."""
        t = learner_state
        with _writer(self.engine).begin() as conn:
            conn.execute(t.update().where(self._key(), t.c.owner == self.owner).values(owner=None))

    def load(self) -> dict[str, Any] | None:
        """The stored state without taking the lease (None: never learned)."""
        t = learner_state
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.state).where(self._key())).first()
        return None if row is None else dict(row.state or {})


def feedback_ids(engine: Engine, model: str, request_ids: Sequence[str]) -> dict[str, int]:
    """The feedback id of each of ``request_ids`` that has feedback."""
    f = monitoring_store.feedback
    found: dict[str, int] = {}
    with engine.connect() as conn:
        for start in range(0, len(request_ids), 500):
            chunk = list(request_ids[start : start + 500])
            query = select(f.c.request_id, f.c.id).where(
                f.c.model == model, f.c.request_id.in_(chunk)
            )
            found.update({rid: int(fid) for rid, fid in conn.execute(query)})
    return found


def feedback_before(engine: Engine, model: str, cursor: int, back: int) -> int:
    """The feedback id ``back`` labels before ``cursor`` (0 when there are fewer)."""
    f = monitoring_store.feedback
    with engine.connect() as conn:
        found = conn.execute(
            select(f.c.id)
            .where(f.c.model == model, f.c.id <= cursor)
            .order_by(f.c.id.desc())
            .offset(back)
            .limit(1)
        ).scalar()
    return int(found or 0)
