"""The server's monitor: predictions in, live quality, drift and alerts out, off the request path.

All the request path pays is ``Monitor.observer``'s callback, which each batcher calls
once per batch it answered: it copies the stacked inputs and outputs and the requests' ids
and start times into the ``ObservationWriter``'s buffer (no per-row work). The writer's
thread computes the predictions of a whole stored batch at once (the rule is in
``torchops.monitoring._record``: argmax and class probabilities — the row itself when it
already sums to 1, else its softmax — for classifiers, the values for regressors).
Inputs bigger than ``max_input_values`` per row are kept for a share
``input_sample_rate`` of the batches. Everything else happens in the monitor's own
thread, every ``poll_interval_s`` (0.5 s):

- observations the writer has just stored (its ``on_write`` hook) go into a tumbling drift
  window per version against the version's reference profile (the registry's ``profile``
  artifact; a version without one gets quality but no input drift) — every
  ``drift_window`` (500) observations the window is scored and starts again;
- feedback is read back incrementally (``ObservationStore.labelled``'s cursor) into three
  quality windows per version: cumulative, the last ``quality_window`` (500) labelled
  rows, the last ``quality_window_seconds`` (3600) seconds of predictions. While a
  model's reads find nothing new they back off — every 2nd, then every 4th poll — until
  one finds labels or this server takes feedback for the model (labels written by
  another process, ``torchops feedback`` without ``--url`` or another worker, then arrive
  within 4 poll intervals); ``refresh()`` called directly reads every model at once;

and every ``snapshot_interval_s`` (10 s) it publishes: Prometheus gauges (the last-N
window and the latest drift verdict, in the server's registry so ``/metrics`` shows them),
TensorBoard scalars and histograms under ``<tensorboard_dir>/<model>/<version>``,
snapshots in the metadata store (when something changed), and alert rules evaluated
(webhook optional). Retention (``retention_days``, ``retention_rows``) runs every
``retention_interval_s`` (600 s).

Alert rules see the metrics of the window they name (``AlertRule.window`` rows; None =
``quality_window``) with the window's labelled row count as samples, and the drift
metrics ``drift_share``, ``dataset_drift`` (0/1), ``prediction_psi`` and
``prediction_js`` of the latest drift report with its row count as samples
(``torchops.monitoring._publish``).

Request ids: a one-row request is observed under its request id, a request of n rows as
``<id>/0`` … ``<id>/<n-1>``; feedback for ``<id>`` with a list of n targets labels every
row (``add_feedback``, ``torchops.monitoring._labels``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from torchops.config import Settings
from torchops.errors import InvalidInput, NotFound, TorchopsError
from torchops.monitoring._batches import Batch, Observation
from torchops.monitoring._capture import ObservedBatch
from torchops.monitoring._labels import Labeller
from torchops.monitoring._live import LiveVersion
from torchops.monitoring._publish import DRIFT_METRICS, Publisher
from torchops.monitoring._record import RowRule
from torchops.monitoring.alerts import AlertStore
from torchops.monitoring.drift import DriftConfig, DriftReport
from torchops.monitoring.feedback import FeedbackResult, FeedbackStore
from torchops.monitoring.observations import ObservationStore, ObservationWriter
from torchops.monitoring.profiles import Profile
from torchops.monitoring.sinks import PrometheusSink, TensorBoardSink
from torchops.monitoring.snapshots import SnapshotStore
from torchops.refs import ModelRef
from torchops.types import Array, Signature

if TYPE_CHECKING:
    from torchops.registry import Registry

__all__ = ["DRIFT_METRICS", "BatchObserver", "Monitor", "MonitorOptions"]

#: what a batcher calls per answered batch: (request ids, rows per request or None,
#: start times, inputs, outputs); see ``Monitor.observer``
BatchObserver = Callable[
    [
        Sequence[int | str],
        Sequence[int] | None,
        Sequence[float],
        Mapping[str, Array],
        Mapping[str, Array],
    ],
    None,
]

log = logging.getLogger("torchops.monitoring")

#: labelled observations read per query
_PAGE = 5000
#: the most polls between two reads of a model's feedback while none comes (the gap
#: doubles from 1 after each read that found nothing)
_QUIET_GAP = 4


@dataclass(frozen=True, slots=True)
class MonitorOptions:
    """How the server monitors (the ``torchops serve`` monitoring options; see module doc).

    ``input_sample_rate`` applies to inputs with more than ``max_input_values`` values per
    row (smaller inputs are always kept); ``retention_days``/``retention_rows`` bound the
    stored observations by age and by count per model (None: keep everything). With several
    server workers only the first is the ``leader``: the others observe, take feedback and
    keep live windows (their drift covers the traffic they answered) but leave snapshots,
    TensorBoard, alerts and retention to it; ``peer_grace_s`` is how long feedback for an
    unknown request id waits for the other workers to write their buffered predictions
    before it is refused (0 for a single process, whose buffer is checked directly).
    ``max_buffer`` (rows) and ``max_buffer_bytes`` (bytes of arrays) bound the observations
    waiting to be written: past either, new ones are dropped and counted.
    """

    input_sample_rate: float = 1.0
    retention_days: float | None = None
    retention_rows: int | None = None
    webhook_url: str | None = None
    quality_window: int = 500
    quality_window_seconds: float = 3600.0
    drift_window: int = 500
    snapshot_interval_s: float = 10.0
    poll_interval_s: float = 0.5
    retention_interval_s: float = 600.0
    max_buffer: int = 100_000
    max_buffer_bytes: int = 256 * 1024 * 1024
    max_input_values: int = 4096
    tensorboard: bool = True
    leader: bool = True
    peer_grace_s: float = 0.0
    drift: DriftConfig = field(default_factory=DriftConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.input_sample_rate <= 1.0:
            raise InvalidInput(f"input sample rate must be in [0, 1], got {self.input_sample_rate}")
        for name in ("quality_window", "drift_window", "max_buffer", "max_buffer_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "quality_window_seconds",
            "snapshot_interval_s",
            "poll_interval_s",
            "retention_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0.0 <= self.peer_grace_s <= 60.0:
            raise InvalidInput(f"peer_grace_s must be in [0, 60], got {self.peer_grace_s!r}")
        if self.retention_days is not None and not self.retention_days > 0:
            raise InvalidInput(f"retention days must be positive, got {self.retention_days}")
        if self.retention_rows is not None and self.retention_rows < 1:
            raise InvalidInput(f"retention rows must be at least 1, got {self.retention_rows}")
        if self.webhook_url is not None and not self.webhook_url.startswith(
            ("http://", "https://")
        ):
            raise InvalidInput(f"the webhook must be an http(s) URL, got {self.webhook_url!r}")

    def cli_args(self) -> list[str]:
        """These options as ``torchops serve`` flags (for worker processes)."""
        args = [
            f"--input-sample-rate={self.input_sample_rate}",
            f"--quality-window={self.quality_window}",
            f"--quality-window-seconds={self.quality_window_seconds}",
            f"--drift-window={self.drift_window}",
            f"--snapshot-interval={self.snapshot_interval_s}",
        ]
        if self.retention_days is not None:
            args.append(f"--retention-days={self.retention_days}")
        if self.retention_rows is not None:
            args.append(f"--retention-rows={self.retention_rows}")
        if self.webhook_url is not None:
            args.append(f"--webhook={self.webhook_url}")
        if not self.leader:
            args.append("--monitor-follower")
        if self.peer_grace_s:
            args.append(f"--peer-grace-s={self.peer_grace_s}")
        return args


class Monitor:
    """Observations, feedback, live quality and drift, sinks and alerts for a server.

    ``metrics_registry``: the Prometheus registry to add the monitoring gauges to (the
    server passes its ``ServingMetrics.registry``); a private one by default.
    """

    def __init__(
        self,
        registry: Registry,
        settings: Settings | None = None,
        options: MonitorOptions | None = None,
        *,
        metrics_registry: CollectorRegistry | None = None,
        seed: int | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings if settings is not None else registry.settings
        self.options = options if options is not None else MonitorOptions()
        self.seed = seed
        opts = self.options
        engine = registry.engine
        self.prometheus = PrometheusSink(
            metrics_registry if metrics_registry is not None else CollectorRegistry()
        )
        # inputs are sampled in ``record`` (so drift sees exactly what is stored)
        self.writer = ObservationWriter(
            engine,
            max_buffer=opts.max_buffer,
            max_buffer_bytes=opts.max_buffer_bytes,
            on_drop=self.prometheus.dropped,
            on_write=self._on_write,
        )
        self.prometheus.follow(self.writer)
        self.observations = ObservationStore(engine)
        self.feedback = FeedbackStore(engine, self.writer)
        self.alerts = AlertStore(engine)
        self.snapshots = SnapshotStore(engine)
        self.tensorboard = (
            TensorBoardSink(self.settings.tensorboard_dir)
            if opts.tensorboard and opts.leader
            else None
        )
        self.publisher = Publisher(
            engine, opts, self.prometheus, self.tensorboard, self.snapshots, self.alerts
        )
        self.labeller = Labeller(
            engine, self.feedback, self.writer, self._signature, peer_grace_s=opts.peer_grace_s
        )
        self._rules: dict[tuple[str, int], RowRule] = {}
        self._signatures: dict[tuple[str, int], Signature] = {}
        self._watched: set[str] = set()
        self._written: deque[Sequence[Batch]] = deque()
        self._states: dict[tuple[str, int], LiveVersion] = {}
        self._missing: set[tuple[str, int]] = set()
        self._cursors: dict[str, int] = {}
        # per model whose last feedback read found nothing: (polls to skip, current gap)
        self._quiet: dict[str, tuple[int, int]] = {}
        self._lock = threading.RLock()
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._random = random.Random(seed).random
        self._record_errors = 0

    def __repr__(self) -> str:
        return f"Monitor({self.registry!r}, options={self.options!r})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observation writer and the monitor's thread (idempotent)."""
        if self._thread is not None:
            return
        self.writer.start()
        self._thread = threading.Thread(target=self._run, name="torchops-monitor", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Write what is buffered, publish a last time, stop the threads."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.writer.close(timeout)
        try:
            self.refresh()
            self.publish()
        except Exception:
            log.exception("the last monitoring update failed")
        self.publisher.close(timeout)

    def _run(self) -> None:
        opts = self.options
        next_publish = time.monotonic() + opts.snapshot_interval_s
        retain = opts.leader and (
            opts.retention_days is not None or opts.retention_rows is not None
        )
        next_retention = time.monotonic()
        while not self._stop.wait(opts.poll_interval_s):
            try:
                self.refresh(eager=False)
                now = time.monotonic()
                if now >= next_publish:
                    next_publish = now + opts.snapshot_interval_s
                    self.publish()
                if retain and now >= next_retention:
                    next_retention = now + opts.retention_interval_s
                    self.apply_retention()
            except Exception:  # a database hiccup must not end monitoring
                log.exception("monitoring update failed; retrying")

    # -- the request path -----------------------------------------------------------------

    def observer(self, model: str, version: int, signature: Signature) -> BatchObserver:
        """The callback a batcher calls with each batch it answered (its compute thread):
        ``(request ids, rows per request or None, start times, inputs, outputs)``, the ids
        being the numbers of server-generated ids (``writer.id_prefix``) or the clients' ids,
        the start times ``time.monotonic()`` values. It does no per-row work."""
        rule = self._rule(model, version, signature, trusted=True)
        put = self.writer.tap(model, version, rule).put
        opts = self.options
        sample = opts.input_sample_rate < 1.0 and rule.input_values > opts.max_input_values
        chance = self._random
        monotonic, now = time.monotonic, time.time

        def observe(
            ids: Sequence[int | str],
            rows: Sequence[int] | None,
            started: Sequence[float],
            inputs: Mapping[str, Array],
            outputs: Mapping[str, Array],
        ) -> None:
            kept = None if sample and chance() >= opts.input_sample_rate else inputs
            put(ids, rows, started, monotonic(), now(), outputs, kept)

        return observe

    def record(
        self,
        model: str,
        version: int,
        signature: Signature,
        request_id: str,
        latency_s: float,
        inputs: Mapping[str, Array],
        outputs: Mapping[str, Array],
    ) -> None:
        """Observe one answered request (one observation per row). Never raises."""
        try:
            rule = self._rules.get((model, version))
            if rule is None:
                rule = self._rule(model, version, signature)
            opts = self.options
            kept: Mapping[str, Array] | None = inputs
            if (
                opts.input_sample_rate < 1.0
                and rule.input_values > opts.max_input_values
                and self._random() >= opts.input_sample_rate
            ):
                kept = None
            first = outputs.get(rule.output) if rule.output is not None else None
            rows = int(first.shape[0]) if first is not None and first.ndim else 1
            self.writer.put_batch(ObservedBatch(
                model, version, [request_id], [rows] if rows > 1 else None, time.time(),
                [0.0], latency_s, dict(outputs), None if kept is None else dict(kept), rule,
            ))  # fmt: skip
        except Exception:
            self._record_errors += 1
            if self._record_errors == 1:
                log.exception("could not observe a prediction of %s:%s", model, version)

    def _rule(
        self, model: str, version: int, signature: Signature, *, trusted: bool = False
    ) -> RowRule:
        rule = RowRule(signature, trusted=trusted)
        self._signatures[(model, version)] = signature
        self._watched.add(model)
        self._rules[(model, version)] = rule
        return rule

    def _on_write(self, batches: Sequence[Batch]) -> None:
        self._written.append(batches)  # from the writer's thread; consumed by refresh

    # -- feedback --------------------------------------------------------------------------

    def add_feedback(
        self, model: str, request_id: str, target: Any, *, source: str = "api"
    ) -> FeedbackResult:
        """Label the prediction ``request_id``; a list target for a request of several rows
        labels each of them. NotFound, Conflict or InvalidInput on a refused label."""
        self.watch(model)
        result = self.labeller.add(model, request_id, target, source=source)
        self._quiet.pop(model, None)  # read at the next poll
        return result

    def add_feedback_many(
        self, model: str, items: Sequence[tuple[str, Any]], *, source: str = "api"
    ) -> FeedbackResult:
        """Add ``(request id, target)`` items, each accepted or refused on its own (a list
        target for a request of several rows labels all its rows)."""
        self.watch(model)
        result = self.labeller.add_many(model, items, source=source)
        self._quiet.pop(model, None)  # read at the next poll
        return result

    # -- reading the live state -----------------------------------------------------------

    def watch(self, model: str) -> None:
        """Follow ``model``'s feedback even before this server has answered for it."""
        self._watched.add(model)

    def quality(self, model: str, version: int | None = None) -> dict[str, Any]:
        """The live view of a version (default: the newest one monitored): the metrics of
        each quality window and the latest drift report."""
        with self._lock:
            if version is None:
                known = [v for (m, v) in self._states if m == model]
                if not known:
                    raise NotFound(f"no monitoring data for model {model!r} yet")
                version = max(known)
            state = self._states.get((model, version))
            if state is None:
                windows: dict[str, dict[str, Any]] = {
                    name: {"count": 0.0} for name in ("cumulative", "last_n", "last_t")
                }
                drift: DriftReport | None = None
            else:
                windows = state.windows()
                drift = state.drift_report()
        opts = self.options
        return {
            "model": model,
            "version": version,
            "windows": windows,
            "drift": drift.to_dict() if drift is not None else None,
            "settings": {
                "quality_window": opts.quality_window,
                "quality_window_seconds": opts.quality_window_seconds,
                "drift_window": opts.drift_window,
            },
        }

    def alert_summary(self, model: str, *, limit: int = 100) -> dict[str, Any]:
        """Active alerts, the newest ``limit`` events and the rules of ``model``."""
        return {
            "model": model,
            "active": [e.to_dict() for e in self.alerts.active(model)],
            "events": [e.to_dict() for e in self.alerts.events(model, limit=limit)],
            "rules": [r.to_dict() for r in self.alerts.rules(model)],
        }

    # -- the monitor's steps ---------------------------------------------------------------

    def refresh(self, *, eager: bool = True) -> None:
        """Consume newly written observations (drift) and newly labelled ones (quality).
        ``eager=False`` (the monitor's own polls) skips the feedback reads of models whose
        last reads found nothing, as the module doc says."""
        with self._lock:
            written: dict[tuple[str, int], list[Batch]] = {}
            while self._written:
                for batch in self._written.popleft():
                    written.setdefault((batch.model, batch.version), []).append(batch)
            for (model, version), group in written.items():
                state = self._state(model, version)
                if state is not None:
                    state.add_written(group)
            for model in sorted(self._watched):
                skip, gap = self._quiet.get(model, (0, 0))
                if skip and not eager:
                    self._quiet[model] = (skip - 1, gap)
                elif self._consume_labelled(model):
                    self._quiet.pop(model, None)
                else:
                    gap = min(2 * gap, _QUIET_GAP) if gap else 1
                    self._quiet[model] = (gap - 1, gap)

    def _consume_labelled(self, model: str) -> bool:
        """Read the feedback that came since the last read; whether any did."""
        start = cursor = self._cursors.get(model, 0)
        while True:
            page = self.observations.labelled(model, since_id=cursor, limit=_PAGE, arrays=False)
            for (name, version), group in _grouped(page.observations).items():
                state = self._state(name, version)
                if state is not None:
                    state.add_labelled(group)
            if page.cursor == cursor:
                break
            cursor = page.cursor
        self._cursors[model] = cursor
        return cursor != start

    def _signature(self, model: str, version: int) -> Signature:
        signature = self._signatures.get((model, version))
        if signature is None:
            signature = self.registry.get(ModelRef(model, version=version)).signature
            self._signatures[(model, version)] = signature
        return signature

    def _state(self, model: str, version: int) -> LiveVersion | None:
        key = (model, version)
        state = self._states.get(key)
        if state is not None or key in self._missing:
            return state
        try:
            signature = self._signature(model, version)
            info = self.registry.get(ModelRef(model, version=version))
        except NotFound:
            log.warning("%s:%s is not in the registry: not monitored", model, version)
            self._missing.add(key)
            return None
        profile: Profile | None = None
        if "profile" in info.artifacts:
            try:
                blob = self.registry.read_artifact(ModelRef(model, version=version), "profile")
                profile = Profile.from_bytes(blob)
            except TorchopsError as exc:
                log.warning("%s:%s: unusable profile, no input drift: %s", model, version, exc)
        opts = self.options
        state = LiveVersion(
            model,
            version,
            signature,
            profile,
            quality_window=opts.quality_window,
            quality_window_seconds=opts.quality_window_seconds,
            drift_window=opts.drift_window,
            drift_config=opts.drift,
        )
        self._states[key] = state
        return state

    def publish(self) -> None:
        """Write every version's state to Prometheus, TensorBoard, snapshots and alerts."""
        with self._publish_lock:
            with self._lock:
                models = sorted({m for m, _ in self._states})
            rules = {model: self.publisher.rules(model) for model in models}
            with self._lock:
                updates = [
                    self.publisher.collect(state, rules.get(state.model, ()))
                    for state in list(self._states.values())
                ]
            for update in updates:
                self.publisher.write(update)
            self.publisher.seen(rules)

    def apply_retention(self) -> int:
        """Delete observations past the retention limits; returns how many."""
        opts = self.options
        age = timedelta(days=opts.retention_days) if opts.retention_days is not None else None
        deleted = self.observations.apply_retention(age, opts.retention_rows)
        if deleted:
            log.info("retention removed %d observations", deleted)
        return deleted


def _grouped(observations: Sequence[Observation]) -> dict[tuple[str, int], list[Observation]]:
    groups: dict[tuple[str, int], list[Observation]] = {}
    for obs in observations:
        groups.setdefault((obs.model, obs.version), []).append(obs)
    return groups
