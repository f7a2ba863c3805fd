"""Shadow scoring: pending challengers answer live traffic in the background.

The learner reads the observation log (every prediction the server made, labelled or
not) and runs each pending challenger on the inputs that arrived after it was
registered. Its answers are never returned to anyone; what is kept is how often it
agrees with the version that did answer, and its compute time per row — recorded on
the challenger as ``shadow_rows``, ``shadow_agreement`` and ``shadow_ms_per_row``.
Working from the log keeps shadow scoring off the request path entirely.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from torchops.learning._rows import predictions, row_inputs, targets
from torchops.monitoring.observations import Observation, ObservationStore
from torchops.runtime import Runtime
from torchops.types import Signature

__all__ = ["ShadowScorer", "ShadowStats"]


@dataclass
class ShadowStats:
    """What one challenger did on live traffic: rows answered, agreements, compute time."""

    rows: int = 0
    agree: float = 0.0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        if not self.rows:
            return {"shadow_rows": 0.0}
        return {
            "shadow_rows": float(self.rows),
            "shadow_agreement": self.agree / self.rows,
            "shadow_ms_per_row": 1000.0 * self.seconds / self.rows,
        }


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """A challenger to shadow: its version, when it was registered, its loaded runtime."""

    version: int
    since: datetime
    runtime: Runtime


class ShadowScorer:
    """Follows the observation log of ``model`` and scores challengers on it."""

    def __init__(
        self, store: ObservationStore, model: str, signature: Signature, *, page_size: int = 500
    ) -> None:
        self.store = store
        self.model = model
        self.signature = signature
        self.page_size = page_size
        self.cursor = 0
        self.stats: dict[int, ShadowStats] = {}

    def start_at_latest(self) -> None:
        """Shadow only traffic from now on (not the stored history)."""
        self.cursor = self.store.latest_cursor(self.model)

    def resume(self, version: int, metrics: Mapping[str, float]) -> None:
        """Continue the stats of ``version`` from the metrics stored on it."""
        rows = int(metrics.get("shadow_rows", 0))
        agree = rows * metrics.get("shadow_agreement", 0.0)
        seconds = rows * metrics.get("shadow_ms_per_row", 0.0) / 1000.0
        self.stats[version] = ShadowStats(rows, agree, seconds)

    def score(self, challengers: Sequence[ShadowTarget]) -> dict[int, dict[str, float]]:
        """Score ``challengers`` on the observations logged since the last call.

        Returns the new metrics of the versions that answered new rows; stats of versions
        not among ``challengers`` any more are forgotten.
        """
        live = {c.version for c in challengers}
        self.stats = {v: s for v, s in self.stats.items() if v in live}
        touched: set[int] = set()
        while True:
            page = self.store.observations(self.model, since_id=self.cursor, limit=self.page_size)
            self.cursor = page.cursor
            for target in challengers:
                if self._score_page(target, page.observations):
                    touched.add(target.version)
            if len(page.observations) < self.page_size:
                return {v: self.stats[v].metrics() for v in touched}

    def _score_page(self, target: ShadowTarget, observations: Sequence[Observation]) -> bool:
        task = self.signature.task
        rows = []
        served = []
        for obs in observations:
            x = row_inputs(self.signature, obs.inputs)
            if x is None or obs.prediction is None or obs.at < target.since:
                continue
            if obs.version == target.version:
                continue  # it answered for real (promoted meanwhile)
            rows.append(x)
            served.append(obs.prediction)
        if not rows:
            return False
        batch = {n: np.concatenate([r[n] for r in rows]) for n in rows[0]}
        start = time.perf_counter()
        pred = predictions(target.runtime, batch, task)
        seconds = time.perf_counter() - start
        answered = targets(task, served)
        s = self.stats.setdefault(target.version, ShadowStats())
        s.rows += len(rows)
        s.seconds += seconds
        if task == "classification":
            s.agree += float(np.count_nonzero(pred == answered))
        else:
            close = np.isclose(pred, answered, rtol=1e-3, atol=1e-6)
            s.agree += float(np.count_nonzero(close.reshape(len(rows), -1).all(axis=1)))
        return True
