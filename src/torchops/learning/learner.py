"""The learner: online updates from labelled feedback, a gate, promotion and a rollback guard.

A ``Learner`` follows one model's alias (``production`` by default). Each ``step``:

1. reads the labelled observations that arrived since its cursor (predictions joined with
   their feedback, in the order the feedback came), each with the inputs the server stored;
2. scores every label against the prediction that was served for it (prequential), then
   gives the row to the ``ReplayBuffer`` (rows with NaN/inf or out-of-range values are
   refused and counted): it is training data for the challengers trained *later* and
   held-out data for every challenger trained *before* it arrived;
3. every ``update_every`` new labels (or ``update_seconds``) trains a copy of the
   champion's TorchScript archive (``IncrementalTrainer``) on the buffer, which also holds
   anchors: part of the registration's reference sample, pseudo-labelled by the champion.
   The copy is registered as a new version (``source="online-learning"``, its parent, the
   feedback window it saw, its training numbers) tagged ``gate=pending``;
4. lets the ``Referee`` judge pending challengers on held-out rows, promote, and guard
   promotions (see ``torchops.learning.referee``).

Its place (cursor, counters, the version guarded) is stored in the database under a lease:
a restarted learner resumes without counting or training on a label twice, two never
follow one alias at once. Registering is atomic: a crash leaves no half version.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from torchops.errors import Conflict, InvalidInput, NotFound, TorchopsError
from torchops.learning._rows import LabelledRows, ServedQuality, row_inputs, targets
from torchops.learning._state import LearnerState, Place, feedback_before, feedback_ids
from torchops.learning.embedded import start_embedded
from torchops.learning.gate import GateConfig
from torchops.learning.guard import GuardConfig
from torchops.learning.prequential import Prequential
from torchops.learning.referee import Challenger, Referee, StepReport, Watch
from torchops.learning.replay import ReplayBuffer
from torchops.learning.shadow import ShadowScorer, ShadowTarget
from torchops.learning.trainer import TrainConfig
from torchops.learning.update import SOURCE, ChampionData, load_champion, register_update
from torchops.refs import DEFAULT_ALIAS, ModelRef, validate_name
from torchops.types import FORMATS, Array, ModelVersion, Task

if TYPE_CHECKING:
    from torchops.monitoring.observations import Observation, ObservationStore
    from torchops.registry import Registry

__all__ = [
    "DEFAULT_GATE",
    "DEFAULT_GUARD",
    "DEFAULT_TRAIN",
    "SOURCE",
    "Learner",
    "start_embedded",
]

log = logging.getLogger("torchops.learning")

#: settings chosen on bench/learning.py's digits drift scenario (seeds 1000+)
DEFAULT_TRAIN = TrainConfig(optimizer="adam", lr=3e-3, steps=200, batch_size=64)
DEFAULT_GATE = GateConfig(min_gain=0.01, min_samples=100, alpha=0.05, min_retention=0.95)
DEFAULT_GUARD = GuardConfig(min_samples=100, alpha=0.01)


class Learner:
    """Online learning for ``model@alias`` from its labelled observations (see the module doc).

    ``looks``: how many times a challenger is judged (after ``gate.min_samples`` held-out
    labels, twice that, ...) before it is refused. ``formats``: what challengers are
    exported to besides TorchScript (the trainable form; ``onnx``/``exported`` slow every
    update down). ``retention_fraction`` of the reference sample is kept out of the
    anchors to check, at the gate, that a challenger still agrees with the champion there.
    ``train_threads``: torch intra-op threads while training (restored afterwards).
    ``shadow``: pending challengers also answer the live traffic in the observation log
    (answers discarded), see ``torchops.learning.shadow``.
    """

    _data: ChampionData  # the champion's data, loaded on the first step

    def __init__(
        self,
        registry: Registry,
        model: str,
        *,
        alias: str = DEFAULT_ALIAS,
        update_every: int = 50,
        update_seconds: float | None = None,
        train: TrainConfig | None = None,
        gate: GateConfig | None = None,
        guard: GuardConfig | None = None,
        looks: int = 3,
        formats: Sequence[str] = ("torchscript",),
        recent: int = 128,
        reservoir: int = 1024,
        recent_fraction: float = 0.5,
        anchor_fraction: float = 0.25,
        retention_fraction: float = 0.5,
        shadow: bool = False,
        actor: str = SOURCE,
        page_size: int = 500,
        train_threads: int | None = 1,
        lease_s: float = 120.0,
        seed: int = 0,
    ) -> None:
        validate_name(model)
        validate_name(alias, "alias")
        if update_every < 1:
            raise InvalidInput(f"update_every must be at least 1, got {update_every}")
        if update_seconds is not None and not update_seconds > 0:
            raise InvalidInput(f"update_seconds must be positive, got {update_seconds}")
        if looks < 1:
            raise InvalidInput(f"looks must be at least 1, got {looks}")
        if not 0.0 <= retention_fraction < 1.0:
            raise InvalidInput(f"retention_fraction must be in [0, 1), got {retention_fraction}")
        if page_size < 1:
            raise InvalidInput(f"page_size must be at least 1, got {page_size}")
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise InvalidInput(f"unknown format {unknown[0]!r}; expected some of {FORMATS}")
        self.registry = registry
        self.model = model
        self.alias = alias
        self.update_every = update_every
        self.update_seconds = update_seconds
        self.train = train or DEFAULT_TRAIN
        self.gate = gate or DEFAULT_GATE
        self.guard = guard or DEFAULT_GUARD
        self.looks = looks
        self.formats = tuple(dict.fromkeys(["torchscript", *formats]))
        self.recent = recent
        self.reservoir = reservoir
        self.recent_fraction = recent_fraction
        self.anchor_fraction = anchor_fraction
        self.retention_fraction = retention_fraction
        self.shadow = shadow
        self.actor = actor
        self.page_size = page_size
        self.train_threads = train_threads
        self.lease_s = lease_s
        self.seed = seed
        self.prequential: Prequential | None = None
        self._lock = threading.RLock()
        self._started = False
        self._lease: LearnerState | None = None
        self._rows = LabelledRows()

    def __repr__(self) -> str:
        return (
            f"Learner(model={self.model!r}, alias={self.alias!r}, "
            f"update_every={self.update_every}, train={self.train!r}, gate={self.gate!r}, "
            f"guard={self.guard!r}, looks={self.looks})"
        )

    # -- running -------------------------------------------------------------------------

    def step(self) -> StepReport:
        """Consume every label available now; train, register, judge, promote, roll back.

        Does nothing until ``model@alias`` exists. Conflict when another learner follows
        the same alias; InvalidInput when the model is neither a classifier nor a regressor.
        """
        with self._lock:
            report = StepReport()
            if not self._started and not self._start():
                return report
            try:
                self._step(report)
            except Conflict:  # the lease was lost: start afresh from the stored place
                self._started = False
                self._data.models.close()
                raise
            return report

    def _step(self, report: StepReport) -> None:
        self._follow_alias(report)
        self._consume_available(report)
        if (
            self.update_seconds is not None
            and self._place.since_update > 0
            and time.monotonic() - self._last_update >= self.update_seconds
        ):
            self._update(self._place.cursor, report)
        if self.shadow:
            self._shadow_score()
        keep = self._referee.keep_after()
        self._rows.trim(self._place.cursor if keep is None else keep)
        self._data.models.keep(self._referee.versions())
        self._save()

    def run(self, *, interval_s: float = 1.0, stop: threading.Event | None = None) -> None:
        """``step`` every ``interval_s`` seconds until ``stop`` is set, then ``close``."""
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                self.step()
                stop.wait(interval_s)
        finally:
            self.close()

    def close(self) -> None:
        """Store the learner's place, give up the lease and unload the models it loaded."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            try:
                self._save()
            finally:
                assert self._lease is not None
                self._lease.release()
                self._data.models.close()

    @property
    def started(self) -> bool:
        """Whether the learner holds its lease and has loaded its place."""
        return self._started

    @property
    def champion(self) -> int | None:
        """The version the learner takes for the champion (None before the first step)."""
        return self._referee.champion if self._started else None

    def status(self) -> dict[str, Any]:
        """Where the learner is: cursor, counters, champion, pending challengers, guard."""
        with self._lock:
            if not self._started:
                return {"model": self.model, "alias": self.alias, "started": False}
            referee = self._referee
            return {
                "model": self.model,
                "alias": self.alias,
                "started": True,
                "champion": referee.champion,
                **asdict(self._place),
                "pending": [
                    {**asdict(c), "held_out": self._rows.count_after(c.cutoff)}
                    for c in referee.pending
                ],
                "watch": asdict(referee.watch) if referee.watch else None,
                "served": self._served.summary(),
                "buffer": {
                    "recent": self._data.buffer.n_recent,
                    "reservoir": self._data.buffer.n_reservoir,
                    "anchors": self._data.buffer.n_anchors,
                },
            }

    # -- start and resume ------------------------------------------------------------------

    def _start(self) -> bool:
        """Take the lease, load the champion's data and the stored place; False: no alias."""
        from torchops.monitoring.observations import ObservationStore

        current = self._alias_target()
        if current is None:
            return False
        self._store: ObservationStore = ObservationStore(self.registry.engine)
        self._lease = LearnerState(
            self.registry.engine, self.model, self.alias, lease_s=self.lease_s
        )
        state = self._lease.acquire()
        try:
            self._restore(state, current)
        except BaseException:
            self._lease.release()
            raise
        self._started = True
        return True

    def _restore(self, state: dict[str, Any], current: int) -> None:
        champion = int(state.get("champion") or current)
        try:
            mv = self.registry.get(ModelRef(self.model, version=champion))
        except NotFound:  # the version it followed was deleted meanwhile
            champion = current
            mv = self.registry.get(ModelRef(self.model, version=current))
        self._load_model(mv)
        self._referee = Referee(
            self.registry,
            self.model,
            self.alias,
            champion=champion,
            models=self._data.models,
            gate=self.gate,
            guard=self.guard,
            looks=self.looks,
            actor=self.actor,
            on_change=self._save,
        )
        self._place = Place.from_state(state)
        self._rows = LabelledRows()
        self._served = ServedQuality(self._data.task, state.get("served"))
        self._last_update = time.monotonic()
        watch = state.get("watch")
        self._referee.watch = Watch(**watch) if watch else None
        self._referee.pending = self._load_pending()
        for c in self._referee.pending:  # registered, then stopped before storing the place
            if c.cutoff > self._place.cursor:
                self._place = replace(self._place, cursor=c.cutoff, since_update=0, first_new=None)
        if not state:
            self._watch_external(None, champion)
        self.prequential = Prequential(task=self._data.task, window=50)
        # rows up to the cursor are replayed: back into the buffer and held for pending
        # challengers and the guard, but neither counted nor trained on a second time
        self._replay_to = self._place.cursor
        keep = self._referee.keep_after()
        self._read_pos = min(self._refill_start(), self._place.cursor if keep is None else keep)
        if self.shadow:
            self._start_shadow(state)
        where = f"{self.model}@{self.alias} after feedback id {self._place.cursor}"
        log.info(
            "learning %s (champion v%d, %d pending)", where, champion, len(self._referee.pending)
        )

    def _load_model(self, mv: ModelVersion) -> None:
        """The champion's data and a new buffer seeded with its anchors."""
        old: ChampionData | None = getattr(self, "_data", None)
        if old is not None:
            old.models.close()

        def make_buffer(task: Task, n_classes: int | None) -> ReplayBuffer:
            return ReplayBuffer(
                recent=self.recent,
                reservoir=self.reservoir,
                recent_fraction=self.recent_fraction,
                anchor_fraction=self.anchor_fraction,
                task=task,
                n_classes=n_classes,
                seed=self.seed,
            )

        self._data = load_champion(
            self.registry,
            mv,
            make_buffer=make_buffer,
            retention_fraction=self.retention_fraction,
            seed=self.seed,
        )
        if self._data.reference is None:
            log.warning(
                "%s:%d has no reference sample: no anchors, no retention check", mv.name, mv.version
            )

    def _load_pending(self) -> list[Challenger]:
        pending = []
        for mv in self.registry.versions(self.model):
            learner = mv.details.get("learner") or {}
            if (
                mv.source == SOURCE
                and mv.tags.get("gate") == "pending"
                and learner.get("alias") == self.alias
            ):
                looks = int(mv.metrics.get("gate_looks", 0))
                pending.append(Challenger(mv.version, int(learner["cutoff"]), looks, mv.created_at))
        return pending

    def _refill_start(self) -> int:
        """Where the last ``recent + reservoir`` labels before the cursor begin: a restarted
        learner refills its buffer from there."""
        back = self.recent + self.reservoir
        return feedback_before(self.registry.engine, self.model, self._place.cursor, back)

    # -- following the alias -----------------------------------------------------------------

    def _alias_target(self) -> int | None:
        return self.registry.aliases(self.model).get((self.model, self.alias))

    def _follow_alias(self, report: StepReport) -> None:
        """Adopt a champion someone else chose; guard it if that was a promotion."""
        referee = self._referee
        current = self._alias_target()
        if current is None or current == referee.champion:
            return
        previous = referee.champion
        log.info("%s@%s moved from v%d to v%d", self.model, self.alias, previous, current)
        mv = self.registry.get(ModelRef(self.model, version=current))
        if mv.signature != self._data.signature:
            self._load_model(mv)
            referee.models = self._data.models
        referee.champion = current
        why = f"the champion changed from v{previous} to v{current} outside the learner"
        for c in list(referee.pending):
            if c.version == current:  # promoted by a learner that stopped before recording it
                ref = ModelRef(self.model, version=c.version)
                self.registry.set_version_tags(ref, {"gate": "promoted"})
                referee.pending.remove(c)
            else:
                referee.retire(c, why, report)
        referee.watch = None
        self._watch_external(previous, current)

    def _watch_external(self, previous: int | None, current: int) -> None:
        """Guard ``current`` against the version it replaced, unless that was a rollback."""
        against = previous
        if against is None:
            moves = self.registry.history(self.model, self.alias)
            against = next(
                (e.from_version for e in reversed(moves) if e.to_version == current), None
            )
        if against is None or against == current:
            return
        try:
            replaced = self.registry.get(ModelRef(self.model, version=against))
        except NotFound:
            return
        if replaced.tags.get("rolled_back") == "true" or replaced.signature != self._data.signature:
            return
        self._referee.watch = Watch(current, against, self._place.cursor)

    # -- consuming labels --------------------------------------------------------------------

    def _consume_available(self, report: StepReport) -> None:
        while True:
            page = self._store.labelled(self.model, since_id=self._read_pos, limit=self.page_size)
            rids = [o.request_id for o in page.observations]
            fids = feedback_ids(self.registry.engine, self.model, rids)
            for obs in page.observations:
                fid = fids.get(obs.request_id)
                if fid is not None:
                    self._consume(obs, fid, report)
            self._read_pos = page.cursor
            self._place.cursor = max(self._place.cursor, page.cursor)
            if len(page.observations) < self.page_size:
                return

    def _consume(self, obs: Observation, fid: int, report: StepReport) -> None:
        replay = fid <= self._replay_to
        x = row_inputs(self._data.signature, obs.inputs)
        y = self._target(obs.label)
        accepted = x is not None and y is not None and self._buffer_add(x, y)
        if not replay:
            self._place.cursor = max(self._place.cursor, fid)
            if x is None:
                self._place.skipped += 1
                report.skipped += 1
            elif not accepted:
                self._place.rejected += 1
                report.rejected += 1
        if x is None or not accepted:
            return
        if not replay:
            self._place.labels += 1
            report.labels += 1
            self._place.since_update += 1
            if self._place.first_new is None:
                self._place.first_new = fid
            self._score_served(obs)
        keep = self._referee.keep_after()
        if keep is not None and fid > keep:
            self._rows.append(fid, obs.version, obs.prediction, obs.label, x)
        self._referee.check(self._rows, self._place.cursor, report)
        if not replay and self._place.since_update >= self.update_every:
            self._update(fid, report)

    def _buffer_add(self, x: dict[str, Array], y: Array) -> bool:
        """Give the row to the buffer; False when it refuses it (bad values or layout)."""
        try:
            return self._data.buffer.add(x, y) == 1
        except InvalidInput:  # inputs shaped or typed unlike the model's
            return False

    def _target(self, label: Any) -> Array | None:
        """The label as the buffer takes it, or None when it cannot be one."""
        try:
            if self._data.task == "classification":
                if isinstance(label, bool) or not isinstance(label, int | float):
                    return None
                return np.asarray([label])
            value = np.asarray(label, dtype=np.float32)
            if value.size != math.prod(self._data.target_row):
                return None
            return value.reshape(1, *self._data.target_row)
        except (TypeError, ValueError):
            return None

    def _score_served(self, obs: Observation) -> None:
        """Prequential: the label against what was served for it, before any training."""
        if obs.prediction is None or self.prequential is None:
            return
        try:
            truth = targets(self._data.task, [obs.label])
            served = targets(self._data.task, [obs.prediction])
            self.prequential.update(truth, served)
        except (TorchopsError, TypeError, ValueError):
            return
        self._served.add(obs.version, truth, served)

    # -- updates -----------------------------------------------------------------------------

    def _update(self, cutoff: int, report: StepReport) -> None:
        """Train a copy of the champion on the buffer and register it as a challenger."""
        champion = self._referee.champion
        window = {
            "first_feedback_id": self._place.first_new,
            "last_feedback_id": cutoff,
            "labels": self._place.since_update,
        }
        self._place.since_update, self._place.first_new = 0, None
        self._last_update = time.monotonic()
        try:
            update = register_update(
                self.registry,
                self.model,
                champion,
                self._data,
                config=replace(self.train, task=self._data.task, seed=self.train.seed + cutoff),
                formats=self.formats,
                actor=self.actor,
                train_threads=self.train_threads,
                window=window,
                learner={
                    "alias": self.alias,
                    "cutoff": cutoff,
                    "labels_seen": self._place.labels,
                    "rejected": self._place.rejected,
                    "gate": {**asdict(self.gate), "looks": self.looks},
                },
            )
        except TorchopsError as exc:
            log.warning("update of %s up to feedback id %d failed: %s", self.model, cutoff, exc)
            report.add("failed", champion, exc.message)
            return
        version = update.version
        self._place.updates += 1
        self._data.models.add(version.version, update.runtime)
        self._referee.pending.append(Challenger(version.version, cutoff, 0, version.created_at))
        self._save()
        log.info("%s: %s", self.model, update.message)
        report.add("registered", version.version, update.message, update.evaluation)

    # -- shadow ------------------------------------------------------------------------------

    def _start_shadow(self, state: dict[str, Any]) -> None:
        self._shadow = ShadowScorer(self._store, self.model, self._data.signature)
        if "shadow_cursor" in state:
            self._shadow.cursor = int(state["shadow_cursor"])
        else:
            self._shadow.start_at_latest()
        for c in self._referee.pending:  # what they answered before the restart
            mv = self.registry.get(ModelRef(self.model, version=c.version))
            self._shadow.resume(c.version, mv.metrics)

    def _shadow_score(self) -> None:
        challengers = [
            ShadowTarget(c.version, c.created_at, self._data.models.runtime(c.version))
            for c in self._referee.pending
            if c.created_at is not None
        ]
        for version, metrics in self._shadow.score(challengers).items():
            self.registry.set_metrics(ModelRef(self.model, version=version), metrics)

    # -- storing the place -------------------------------------------------------------------

    def _save(self) -> None:
        if self._lease is None:
            return
        referee = self._referee
        state: dict[str, Any] = {
            **asdict(self._place),
            "champion": referee.champion,
            "watch": asdict(referee.watch) if referee.watch else None,
            "served": self._served.totals,
        }
        if self.shadow:
            state["shadow_cursor"] = self._shadow.cursor
        self._lease.save(state)
