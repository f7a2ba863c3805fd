"""The rollback guard: after a promotion, watch the new version against its parent.

The server shadow-scores the parent on the same live labelled window the new version
answers. Once ``min_samples`` labels are in, a drop of at least ``max_drop`` (relative,
like the gate's gain) that is significant at ``alpha`` asks for a rollback; the same tests
as the gate are used, in the other direction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from torchops.errors import InvalidInput
from torchops.learning.gate import _paired, paired_p_value, row_losses
from torchops.types import Array, Task

__all__ = ["Decision", "GuardConfig", "check_rollback"]


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """When a promoted version is rolled back to its parent.

    ``max_drop`` is relative: ``(parent - new) / parent`` on accuracy, the relative RMSE
    increase for regressors.
    """

    min_samples: int = 200
    alpha: float = 0.05
    max_drop: float = 0.02
    n_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise InvalidInput(f"min_samples must be at least 1, got {self.min_samples}")
        if not 0.0 < self.alpha < 1.0:
            raise InvalidInput(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.max_drop < 1.0:
            raise InvalidInput(f"max_drop must be in [0, 1), got {self.max_drop}")
        if self.n_resamples < 1:
            raise InvalidInput(f"n_resamples must be at least 1, got {self.n_resamples}")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the guard concluded on one window.

    ``settled`` is False while fewer than ``min_samples`` labels are in (keep watching);
    ``new`` and ``parent`` are accuracies or RMSEs, ``drop`` the relative loss of quality.
    """

    rollback: bool
    settled: bool
    test: str
    n: int
    new: float
    parent: float
    drop: float
    p_value: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_rollback(
    task: Task,
    y_true: Array,
    new_pred: Array,
    parent_pred: Array,
    config: GuardConfig | None = None,
) -> Decision:
    """Compare the promoted version (``new_pred``) with its parent on the same live labels."""
    config = config or GuardConfig()
    if task not in ("classification", "regression"):
        raise InvalidInput(f"the guard checks classification or regression models, not {task!r}")
    truth, new = _paired(task, y_true, new_pred, "predictions of the new version")
    _, parent = _paired(task, y_true, parent_pred, "predictions of the parent")
    n = len(truth)
    if task == "classification":
        test, metric = "mcnemar", "accuracy"
        new_ok = new == truth
        parent_ok = parent == truth
        new_score = float(np.mean(new_ok)) if n else 0.0
        parent_score = float(np.mean(parent_ok)) if n else 0.0
        drop = (parent_score - new_score) / parent_score if parent_score > 0 else 0.0
        worse = new_score < parent_score
    else:
        test, metric = "bootstrap", "RMSE"
        new_loss = row_losses(truth, new)
        parent_loss = row_losses(truth, parent)
        new_score = float(np.sqrt(np.mean(new_loss))) if n else 0.0
        parent_score = float(np.sqrt(np.mean(parent_loss))) if n else 0.0
        if parent_score > 0:
            drop = (new_score - parent_score) / parent_score
        else:
            drop = float("inf") if new_score > 0 else 0.0
        worse = new_score > parent_score

    def decision(rollback: bool, settled: bool, p_value: float | None, reason: str) -> Decision:
        return Decision(rollback, settled, test, n, new_score, parent_score, drop, p_value, reason)

    if n < config.min_samples:
        reason = f"keep watching: {n} of {config.min_samples} labels"
        return decision(False, False, None, reason)
    # one-sided for regression: is the parent better than the new version?
    p_value = paired_p_value(
        task, truth, new, parent, n_resamples=config.n_resamples, seed=config.seed
    )
    summary = (
        f"{metric} parent {parent_score:.4f}, new {new_score:.4f} (drop {drop:+.2%}), "
        f"{test} p={p_value:.3g} on {n} labels"
    )
    if worse and drop >= config.max_drop and p_value < config.alpha:
        return decision(True, True, p_value, f"roll back: {summary}")
    return decision(False, True, p_value, f"keep: {summary}")
