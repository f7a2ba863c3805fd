"""Alert rules per model, evaluated on live metrics; firing and resolved events.

A rule compares one metric (a key of the quality or drift values, e.g. ``accuracy``,
``f1_macro``, ``rmse``, ``drift_share``) with a threshold. Each rule has a state per
model version: it fires once when the condition holds on at least ``min_samples``
samples and resolves once when, on as many samples, it no longer holds. Every transition
is stored (so state survives restarts and two evaluators never record it twice), logged
on ``torchops.alerts``, and optionally POSTed as JSON to a webhook from a background
thread; a webhook failure is logged, never raised.
"""

from __future__ import annotations

import logging
import math
import operator
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import httpx
from sqlalchemy import Connection, Engine, RowMapping, func, select
from sqlalchemy.exc import IntegrityError

from torchops.errors import Conflict, InvalidInput, NotFound
from torchops.monitoring import store
from torchops.refs import validate_name
from torchops.registry.store import utcnow

__all__ = ["AlertEvaluator", "AlertEvent", "AlertRule", "AlertStore"]

log = logging.getLogger("torchops.alerts")

Op = Literal["<", "<=", ">", ">="]
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
State = Literal["firing", "resolved"]
_STATES: tuple[str, ...] = get_args(State)


@dataclass(frozen=True, slots=True)
class AlertRule:
    """Fire when ``metric op threshold`` holds on at least ``min_samples`` samples.

    ``window`` is the number of latest labelled rows the metric is computed over (None:
    what the monitor's default window covers); the evaluator is handed the values.
    """

    model: str
    name: str
    metric: str
    op: str
    threshold: float
    window: int | None = None
    min_samples: int = 1

    def __post_init__(self) -> None:
        validate_name(self.model)
        validate_name(self.name, "alert rule name")
        if not isinstance(self.metric, str) or not 0 < len(self.metric) <= 256:
            raise InvalidInput(f"alert rule {self.name!r}: metric must be a non-empty name")
        if self.op not in _OPS:
            raise InvalidInput(
                f"alert rule {self.name!r}: op must be one of {list(_OPS)}, got {self.op!r}"
            )
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, int | float)
            or not math.isfinite(self.threshold)
        ):
            raise InvalidInput(
                f"alert rule {self.name!r}: threshold must be a finite number, "
                f"got {self.threshold!r}"
            )
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            raise InvalidInput(
                f"alert rule {self.name!r}: window must be a positive number of rows or None, "
                f"got {self.window!r}"
            )
        if not _is_int(self.min_samples) or self.min_samples < 0:
            raise InvalidInput(
                f"alert rule {self.name!r}: min_samples must be an integer >= 0, "
                f"got {self.min_samples!r}"
            )

    def holds(self, value: float) -> bool:
        """Whether ``value`` meets the alert condition."""
        return _OPS[self.op](value, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "name": self.name,
            "metric": self.metric,
            "op": self.op,
            "threshold": self.threshold,
            "window": self.window,
            "min_samples": self.min_samples,
        }


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A rule started firing or resolved for one model version."""

    id: int
    rule: str
    model: str
    version: int
    state: str
    value: float | None
    at: datetime
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "model": self.model,
            "version": self.version,
            "state": self.state,
            "value": self.value,
            "at": self.at.isoformat(),
            "message": self.message,
        }


class AlertStore:
    """Alert rules and the history of their events, in the metadata store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        store.ensure_tables(engine)

    def add_rule(self, rule: AlertRule) -> None:
        """Store ``rule``; Conflict when the model already has a rule of that name."""
        row = {**rule.to_dict(), "threshold": float(rule.threshold), "created_at": utcnow()}
        try:
            with store.writer(self.engine).begin() as conn:
                conn.execute(store.alert_rules.insert(), [row])
        except IntegrityError:
            raise Conflict(
                f"model {rule.model!r} already has an alert rule named {rule.name!r}"
            ) from None

    def rules(self, model: str) -> list[AlertRule]:
        """The model's rules, by name."""
        r = store.alert_rules
        query = select(r).where(r.c.model == validate_name(model)).order_by(r.c.name)
        with self.engine.connect() as conn:
            return [_rule(row._mapping) for row in conn.execute(query)]

    def remove_rule(self, model: str, name: str) -> None:
        """Delete a rule and its events; NotFound when there is no such rule."""
        r = store.alert_rules
        with store.writer(self.engine).begin() as conn:
            rule_id = _rule_id(conn, validate_name(model), name)
            if rule_id is None:
                raise NotFound(f"model {model!r} has no alert rule named {name!r}")
            conn.execute(store.alert_events.delete().where(store.alert_events.c.rule_id == rule_id))
            conn.execute(r.delete().where(r.c.id == rule_id))

    def events(
        self, model: str, *, limit: int | None = 100, version: int | None = None
    ) -> list[AlertEvent]:
        """The model's alert events, newest first."""
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
        e = store.alert_events
        query = _events_query().where(e.c.model == validate_name(model))
        if version is not None:
            query = query.where(e.c.version == version)
        query = query.order_by(e.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_event(row._mapping) for row in conn.execute(query)]

    def active(self, model: str) -> list[AlertEvent]:
        """The firing event of every (rule, version) of the model that has not resolved."""
        e = store.alert_events
        latest = (
            select(func.max(e.c.id))
            .where(e.c.model == validate_name(model))
            .group_by(e.c.rule_id, e.c.version)
        )
        query = _events_query().where(e.c.id.in_(latest), e.c.state == "firing")
        with self.engine.connect() as conn:
            return [_event(row._mapping) for row in conn.execute(query.order_by(e.c.id))]

    def transition(
        self, rule: AlertRule, version: int, state: str, value: float | None, message: str
    ) -> AlertEvent | None:
        """Record ``state`` for ``rule`` on ``version`` unless it is already in it.

        Returns the new event, or None when nothing changed (or the rule was removed).
        The check and the insert are one write transaction, with the rule's row locked on
        PostgreSQL, so concurrent evaluators record a transition once.
        """
        if state not in _STATES:
            raise InvalidInput(f"alert state must be one of {list(_STATES)}, got {state!r}")
        e = store.alert_events
        with store.writer(self.engine).begin() as conn:
            rule_id = _rule_id(conn, rule.model, rule.name, lock=True)
            if rule_id is None:
                return None
            current = conn.execute(
                select(e.c.state)
                .where(e.c.rule_id == rule_id, e.c.version == version)
                .order_by(e.c.id.desc())
                .limit(1)
            ).scalar()
            if (current or "resolved") == state:
                return None
            at = utcnow()
            row = {
                "rule_id": rule_id,
                "model": rule.model,
                "version": version,
                "state": state,
                "value": value,
                "at": at,
                "message": message,
            }
            event_id = conn.execute(e.insert().returning(e.c.id), [row]).scalar_one()
        return AlertEvent(event_id, rule.name, rule.model, version, state, value, at, message)


class AlertEvaluator:
    """Checks a model's rules against fresh metric values and records transitions."""

    def __init__(
        self, store: AlertStore, *, webhook_url: str | None = None, timeout_s: float = 2.0
    ) -> None:
        self.store = store
        self.webhook_url = webhook_url
        self.timeout_s = timeout_s
        self._outbox: queue.Queue[AlertEvent | None] = queue.Queue()
        self._sender: threading.Thread | None = None
        self._sender_lock = threading.Lock()

    def evaluate(
        self, model: str, version: int, values: Mapping[str, float], samples: int
    ) -> list[AlertEvent]:
        """Fire or resolve the model's rules for ``version``; returns the new events.

        A rule whose metric is missing from ``values`` (or not finite) keeps its state, as
        does every rule with fewer than ``min_samples`` samples.
        """
        firing = {(ev.rule, ev.version) for ev in self.store.active(model)}
        events: list[AlertEvent] = []
        for rule in self.store.rules(model):
            raw = values.get(rule.metric)
            if raw is None or samples < rule.min_samples:
                continue
            value = float(raw)
            if not math.isfinite(value):
                continue
            is_firing = (rule.name, version) in firing
            holds = rule.holds(value)
            event: AlertEvent | None = None
            if holds and not is_firing:
                message = (
                    f"{model} v{version}: {rule.metric} = {value:.6g} {rule.op} "
                    f"{rule.threshold:g} on {samples} samples (rule {rule.name!r})"
                )
                event = self.store.transition(rule, version, "firing", value, message)
            elif not holds and is_firing:
                message = (
                    f"{model} v{version}: {rule.metric} = {value:.6g}, no longer {rule.op} "
                    f"{rule.threshold:g} on {samples} samples (rule {rule.name!r})"
                )
                event = self.store.transition(rule, version, "resolved", value, message)
            if event is not None:
                events.append(event)
                level = logging.WARNING if event.state == "firing" else logging.INFO
                log.log(level, "alert %s: %s", event.state, event.message)
                self._notify(event)
        return events

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued for the webhook, then stop its thread."""
        with self._sender_lock:
            sender, self._sender = self._sender, None
        if sender is not None:
            self._outbox.put(None)
            sender.join(timeout)

    def _notify(self, event: AlertEvent) -> None:
        if self.webhook_url is None:
            return
        with self._sender_lock:
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_loop, name="torchops-alert-webhook", daemon=True
                )
                self._sender.start()
        self._outbox.put(event)

    def _send_loop(self) -> None:
        url = self.webhook_url
        assert url is not None
        with httpx.Client(timeout=self.timeout_s) as client:
            while (event := self._outbox.get()) is not None:
                try:
                    response = client.post(url, json=event.to_dict())
                    if response.status_code >= 400:
                        log.warning(
                            "alert webhook %s answered %d for event %d",
                            url,
                            response.status_code,
                            event.id,
                        )
                except httpx.HTTPError as exc:
                    log.warning("alert webhook %s failed for event %d: %s", url, event.id, exc)


def _events_query() -> Any:
    e, r = store.alert_events, store.alert_rules
    return select(e, r.c.name.label("rule_name")).join(r, r.c.id == e.c.rule_id)


def _rule_id(conn: Connection, model: str, name: str, *, lock: bool = False) -> int | None:
    r = store.alert_rules
    query = select(r.c.id).where(r.c.model == model, r.c.name == name)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    rule_id: int | None = conn.execute(query).scalar()
    return rule_id


def _rule(row: RowMapping) -> AlertRule:
    return AlertRule(
        model=row["model"],
        name=row["name"],
        metric=row["metric"],
        op=row["op"],
        threshold=row["threshold"],
        window=row["window"],
        min_samples=row["min_samples"],
    )


def _event(row: RowMapping) -> AlertEvent:
    return AlertEvent(
        id=row["id"],
        rule=row["rule_name"],
        model=row["model"],
        version=row["version"],
        state=row["state"],
        value=row["value"],
        at=row["at"],
        message=row["message"],
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
