"""The referee: pending challengers, the gate's looks, promotions and the rollback guard.

A challenger is judged on the labelled rows that arrived after its training cutoff (it
never trained on them), against the champion on the same rows, after ``min_samples``,
twice, ... ``looks`` times that many rows, each look at ``alpha / looks`` (Bonferroni). The
verdict's numbers are stored on the version (metrics ``gate_*``); a promotion moves the
alias with them as the reason, a refusal after the last look tags it ``gate=refused``.

After a promotion the guard compares the promoted version's live predictions with the
replaced version's (scored offline on the same inputs) over the next ``min_samples`` rows
the promoted version served, and moves the alias back on a significant drop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from torchops.errors import InvalidInput, NotFound
from torchops.learning._rows import LabelledRows, predictions, targets
from torchops.learning.gate import GateConfig, Verdict, judge
from torchops.learning.guard import GuardConfig, check_rollback
from torchops.refs import ModelRef, validate_name
from torchops.registry.store import utcnow
from torchops.types import Array, Task

if TYPE_CHECKING:
    from torchops.registry import Registry
    from torchops.runtime import Runtime

__all__ = [
    "Challenger",
    "LearnerEvent",
    "Models",
    "Referee",
    "StepReport",
    "Watch",
    "previous_version",
    "rollback",
]

log = logging.getLogger("torchops.learning")


@dataclass(frozen=True, slots=True)
class LearnerEvent:
    """Something the learner did: ``registered``, ``promoted``, ``refused``, ``superseded``,
    ``rolled_back``, ``kept`` (the guard let a promotion stand), ``failed`` (an update)."""

    kind: str
    version: int
    message: str
    at: datetime
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


@dataclass
class StepReport:
    """What one ``Learner.step`` consumed and did."""

    labels: int = 0
    rejected: int = 0
    skipped: int = 0
    events: list[LearnerEvent] = field(default_factory=list)

    def versions(self, kind: str) -> list[int]:
        return [e.version for e in self.events if e.kind == kind]

    def add(
        self, kind: str, version: int, message: str, numbers: dict[str, Any] | None = None
    ) -> None:
        self.events.append(LearnerEvent(kind, version, message, utcnow(), numbers or {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "events": [e.to_dict() for e in self.events],
        }


@dataclass
class Challenger:
    version: int
    cutoff: int  # the last feedback id it may have trained on
    looks: int = 0
    created_at: datetime | None = None


@dataclass
class Watch:
    version: int  # the promoted version
    against: int  # the version it replaced
    since: int  # the feedback id at the promotion


class Models:
    """Loaded versions of one model and their predictions on the retention sample."""

    def __init__(
        self, registry: Registry, model: str, task: Task, retention: dict[str, Array] | None
    ) -> None:
        self.registry = registry
        self.model = model
        self.task = task
        self.retention = retention
        self._runtimes: dict[int, Runtime] = {}
        self._retention: dict[int, Array] = {}

    def runtime(self, version: int) -> Runtime:
        runtime = self._runtimes.get(version)
        if runtime is None:
            runtime = self.registry.load(ModelRef(self.model, version=version), "torchscript")
            self._runtimes[version] = runtime
        return runtime

    def add(self, version: int, runtime: Runtime) -> None:
        self._runtimes[version] = runtime

    def predict(self, version: int, inputs: dict[str, Array]) -> Array:
        return predictions(self.runtime(version), inputs, self.task)

    def on_retention(self, version: int) -> Array | None:
        if self.retention is None:
            return None
        cached = self._retention.get(version)
        if cached is None:
            cached = self._retention[version] = self.predict(version, self.retention)
        return cached

    def keep(self, versions: set[int]) -> None:
        for version in [v for v in self._runtimes if v not in versions]:
            self._runtimes.pop(version).close()
            self._retention.pop(version, None)

    def close(self) -> None:
        self.keep(set())


class Referee:
    """Judges pending challengers, promotes, and guards promotions of ``model@alias``.

    ``on_change`` is called after every alias move (the learner stores its place then).
    """

    def __init__(
        self,
        registry: Registry,
        model: str,
        alias: str,
        *,
        champion: int,
        models: Models,
        gate: GateConfig,
        guard: GuardConfig,
        looks: int,
        actor: str,
        on_change: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.model = model
        self.alias = alias
        self.champion = champion
        self.models = models
        self.gate = gate
        self.guard = guard
        self.looks = looks
        self.actor = actor
        self.on_change = on_change
        self.pending: list[Challenger] = []
        self.watch: Watch | None = None

    @property
    def task(self) -> Task:
        return self.models.task

    def keep_after(self) -> int | None:
        """Rows after this feedback id are still needed (None: none are)."""
        marks = [c.cutoff for c in self.pending]
        if self.watch is not None:
            marks.append(self.watch.since)
        return min(marks) if marks else None

    def versions(self) -> set[int]:
        """The versions the referee may still run."""
        keep = {self.champion, *(c.version for c in self.pending)}
        if self.watch is not None:
            keep |= {self.watch.version, self.watch.against}
        return keep

    def check(self, rows: LabelledRows, cursor: int, report: StepReport) -> None:
        """Run the guard and every gate look that ``rows`` now allow."""
        self._check_guard(rows, report)
        per_look = self.gate.min_samples
        for c in list(self.pending):
            held = rows.count_after(c.cutoff)
            while c in self.pending and c.looks < self.looks and held >= (c.looks + 1) * per_look:
                c.looks += 1
                verdict = self._judge(c, rows, rows.after(c.cutoff)[: c.looks * per_look])
                self._set_metrics(c.version, _gate_metrics(verdict, c.looks))
                if verdict.promote:
                    if not self._alias_moved():  # else: adopted, and judged anew, next step
                        self._promote(c, verdict, cursor, report)
                    return
                if c.looks == self.looks:
                    self._tag(c.version, {"gate": "refused", "gate_reason": verdict.reason})
                    self.pending.remove(c)
                    log.info("%s: v%d refused: %s", self.model, c.version, verdict.reason)
                    report.add("refused", c.version, verdict.reason, verdict.to_dict())

    def retire(self, c: Challenger, why: str, report: StepReport) -> None:
        self._tag(c.version, {"gate": "superseded", "gate_reason": why})
        self.pending.remove(c)
        report.add("superseded", c.version, why)

    # -- the gate ----------------------------------------------------------------------------

    def _judge(self, c: Challenger, rows: LabelledRows, positions: list[int]) -> Verdict:
        x = rows.stack(positions)
        y = targets(self.task, [rows.labels[i] for i in positions])
        old = self.models.predict(self.champion, x)
        new = self.models.predict(c.version, x)
        reference = None
        on_reference = self.models.on_retention(self.champion)
        if on_reference is not None:
            assert self.models.retention is not None
            reference = (on_reference, self.models.predict(c.version, self.models.retention))
        config = replace(self.gate, alpha=self.gate.alpha / self.looks)
        return judge(self.task, y, old, new, config, reference=reference)

    def _promote(self, c: Challenger, verdict: Verdict, cursor: int, report: StepReport) -> None:
        champion = self.champion
        summary = verdict.reason.removeprefix("promote: ")
        retention = f", retention {verdict.retention:.3f}" if verdict.retention is not None else ""
        reason = (
            f"online learning: v{c.version} beat v{champion} on {verdict.n} held-out labels "
            f"it never trained on: {summary} (alpha {self.gate.alpha / self.looks:.3g}, look "
            f"{c.looks}/{self.looks}){retention}"
        )
        self.registry.set_alias(self.model, self.alias, c.version, actor=self.actor, reason=reason)
        self._tag(c.version, {"gate": "promoted", "gate_reason": reason})
        self.pending.remove(c)
        self.champion = c.version
        self.watch = Watch(c.version, champion, cursor)
        log.info("%s: %s", self.model, reason)
        report.add("promoted", c.version, reason, verdict.to_dict())
        for older in [p for p in self.pending if p.cutoff <= c.cutoff]:
            self.retire(older, f"v{c.version}, trained on more labels, was promoted", report)
        self.on_change()

    # -- the rollback guard ------------------------------------------------------------------

    def _check_guard(self, rows: LabelledRows, report: StepReport) -> None:
        watch = self.watch
        if watch is None or watch.version != self.champion:
            return
        positions = rows.after(watch.since, version=watch.version)
        if len(positions) < self.guard.min_samples:
            return
        positions = positions[: self.guard.min_samples]
        x = rows.stack(positions)
        y = targets(self.task, [rows.labels[i] for i in positions])
        served = [rows.served[i] for i in positions]
        if any(s is None for s in served):
            new = self.models.predict(watch.version, x)
        else:
            new = targets(self.task, served)
        parent = self.models.predict(watch.against, x)
        decision = check_rollback(self.task, y, new, parent, self.guard)
        numbers = {
            "guard_n": float(decision.n),
            "guard_new": decision.new,
            "guard_parent": decision.parent,
            "guard_drop": decision.drop,
            "guard_p_value": decision.p_value,
        }
        self._set_metrics(watch.version, numbers)
        self.watch = None
        if not decision.rollback or self._alias_moved():
            self._tag(watch.version, {"guard": "kept"})
            report.add("kept", watch.version, decision.reason, decision.to_dict())
            self.on_change()
            return
        reason = (
            f"rollback guard: v{watch.version} served worse than v{watch.against} on the "
            f"{decision.n} labels after its promotion: "
            + decision.reason.removeprefix("roll back: ")
        )
        self.registry.set_alias(
            self.model, self.alias, watch.against, actor=self.actor, reason=reason
        )
        self._tag(
            watch.version,
            {"guard": "rolled_back", "rolled_back": "true", "rollback_reason": reason},
        )
        self.champion = watch.against
        log.warning("%s: %s", self.model, reason)
        report.add("rolled_back", watch.version, reason, decision.to_dict())
        for c in list(self.pending):
            self.retire(c, f"v{watch.version} was rolled back", report)
        self.on_change()

    # -- helpers -----------------------------------------------------------------------------

    def _alias_moved(self) -> bool:
        """Whether someone else moved the alias since the step began (the learner then
        adopts their choice on its next step instead of overriding it)."""
        return self.registry.aliases(self.model).get((self.model, self.alias)) != self.champion

    def _tag(self, version: int, tags: dict[str, str | None]) -> None:
        self.registry.set_version_tags(ModelRef(self.model, version=version), tags)

    def _set_metrics(self, version: int, numbers: dict[str, float | None]) -> None:
        finite = {k: v for k, v in numbers.items() if v is not None and math.isfinite(v)}
        self.registry.set_metrics(ModelRef(self.model, version=version), finite)


def _gate_metrics(verdict: Verdict, look: int) -> dict[str, float | None]:
    return {
        "gate_looks": float(look),
        "gate_n": float(verdict.n),
        "gate_champion": verdict.champion,
        "gate_challenger": verdict.challenger,
        "gate_gain": verdict.gain,
        "gate_p_value": verdict.p_value,
        "gate_retention": verdict.retention,
    }


def previous_version(registry: Registry, name: str, alias: str) -> int | None:
    """The version ``alias`` pointed to before its current one, skipping versions marked
    ``rolled_back`` and deleted ones (None: there is none)."""
    current = registry.aliases(name).get((name, alias))
    existing = {mv.version: mv for mv in registry.versions(name)}
    for event in reversed(registry.history(name, alias)):
        candidate = event.from_version
        if candidate is None or candidate == current or candidate not in existing:
            continue
        if existing[candidate].tags.get("rolled_back") != "true":
            return candidate
    return None


def rollback(
    registry: Registry,
    name: str,
    *,
    alias: str = "production",
    to: int | None = None,
    reason: str | None = None,
    actor: str | None = None,
) -> tuple[int, int]:
    """Move ``alias`` back (to ``to``, else the previous version in its history) and mark
    the version it leaves ``rolled_back=true`` with the reason; returns ``(from, to)``."""
    validate_name(name)
    validate_name(alias, "alias")
    current = registry.aliases(name).get((name, alias))
    if current is None:
        raise NotFound(f"model {name!r} has no alias {alias!r} to roll back")
    target = to if to is not None else previous_version(registry, name, alias)
    if target is None:
        raise NotFound(
            f"no earlier version in the history of {name}@{alias} (at v{current}) to roll back "
            "to; name one with --to"
        )
    if target == current:
        raise InvalidInput(f"{name}@{alias} already points to v{current}")
    registry.get(ModelRef(name, version=target))  # NotFound naming the version
    why = reason or f"manual rollback from v{current} to v{target}"
    registry.set_alias(name, alias, target, actor=actor, reason=why)
    tags: dict[str, str | None] = {"rolled_back": "true", "rollback_reason": why}
    registry.set_version_tags(ModelRef(name, version=current), tags)
    return current, target
