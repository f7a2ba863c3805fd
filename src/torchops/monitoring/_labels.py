"""Feedback as the server takes it: by request id, a list for a request of several rows.

A request of n rows is observed as ``<id>/0`` … ``<id>/<n-1>``; feedback for ``<id>`` with
a list of n targets labels each row (every target checked first: all or nothing). With
several server workers (``peer_grace_s`` > 0), feedback for an id no process has stored
yet waits that long for the other workers' writers before it is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine

from torchops.errors import Conflict, InvalidInput, NotFound, TorchopsError
from torchops.monitoring.feedback import FeedbackResult, FeedbackStore, normalize_target
from torchops.monitoring.observations import ObservationWriter
from torchops.types import Signature

__all__ = ["Labeller"]


class Labeller:
    """Adds feedback through ``feedback``, knowing the rows of multi-row requests."""

    def __init__(
        self,
        engine: Engine,
        feedback: FeedbackStore,
        writer: ObservationWriter,
        signature: Callable[[str, int], Signature],
        *,
        peer_grace_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.feedback = feedback
        self.writer = writer
        self.signature = signature
        self.peer_grace_s = peer_grace_s

    def add(
        self, model: str, request_id: str, target: Any, *, source: str = "api"
    ) -> FeedbackResult:
        """Label the prediction ``request_id``; a list target for a request of several rows
        labels each of them. NotFound, Conflict or InvalidInput on a refused label."""
        grace = self.peer_grace_s
        if grace > 0 and not self.versions(model, [request_id, f"{request_id}/0"]):
            time.sleep(grace)  # another worker may still be writing it
        try:
            self.feedback.add(model, request_id, target, source=source)
            return FeedbackResult(1, [])
        except NotFound:
            expanded = self._expand(model, request_id, target)
            if expanded is None:
                raise
        result = self.feedback.add_many(model, expanded, source=source)
        if result.accepted == 0 and result.errors:
            raise Conflict(f"request {request_id!r}: {result.errors[0][1]}")
        return result

    def add_many(
        self, model: str, items: Sequence[tuple[str, Any]], *, source: str = "api"
    ) -> FeedbackResult:
        """Add ``(request id, target)`` items, each accepted or refused on its own (a list
        target for a request of several rows labels all its rows)."""
        pairs: list[tuple[str, Any]] = []
        origin: list[int] = []
        errors: list[tuple[int, str]] = []
        candidates = [
            str(item[0])
            for item in items
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], list)
        ]
        known = self._known(model, candidates) if candidates else set()
        grace = self.peer_grace_s
        if grace > 0:
            ids = [str(item[0]) for item in items if isinstance(item, tuple) and len(item) == 2]
            if len(self._known(model, ids)) < len(set(ids)):
                time.sleep(grace)  # other workers may still be writing some of them
                known = self._known(model, candidates) if candidates else set()
        for index, item in enumerate(items):
            request_id, target = item
            if isinstance(target, list) and isinstance(request_id, str) and request_id not in known:
                try:
                    expanded = self._expand(model, request_id, target)
                except TorchopsError as exc:
                    errors.append((index, exc.message))
                    continue
                if expanded is not None:
                    pairs.extend(expanded)
                    origin.extend([index] * len(expanded))
                    continue
            pairs.append((request_id, target))
            origin.append(index)
        result = self.feedback.add_many(model, pairs, source=source)
        errors.extend((origin[i], message) for i, message in result.errors)
        return FeedbackResult(result.accepted, sorted(errors))

    def _expand(self, model: str, request_id: str, target: Any) -> list[tuple[str, Any]] | None:
        """``[(<id>/<row>, target)]`` when ``request_id`` is a request of several rows and
        ``target`` holds one valid target per row; None when it is no such request."""
        first = f"{request_id}/0"
        versions = self.versions(model, [first])
        if first not in versions:
            return None
        rows = target if isinstance(target, list) else None
        count = len(rows) if rows is not None else 0
        if rows is None or count < 1 or self.versions(model, [f"{request_id}/{count}"]):
            raise InvalidInput(
                f"request {request_id!r} of model {model!r} predicted several rows: give a "
                f"list with one target per row, or label a row as '{request_id}/<row>'"
            )
        last = f"{request_id}/{count - 1}"
        if count > 1 and last not in self.versions(model, [last]):
            raise InvalidInput(
                f"request {request_id!r} of model {model!r} predicted fewer than {count} rows"
            )
        signature = self.signature(model, versions[first])
        ids = [f"{request_id}/{i}" for i in range(count)]
        for rid, value in zip(ids, rows, strict=True):
            normalize_target(signature, value, rid)  # all or nothing
        return list(zip(ids, rows, strict=True))

    def versions(self, model: str, request_ids: Sequence[str]) -> dict[str, int]:
        """``request id -> version`` of the given predictions that are buffered or stored."""
        found = self.writer.pending_versions(model, request_ids)
        missing = {rid for rid in request_ids if rid not in found}
        found.update(self.feedback.observations.versions(model, missing))
        return found

    def _known(self, model: str, request_ids: Sequence[str]) -> set[str]:
        return set(self.versions(model, request_ids))
