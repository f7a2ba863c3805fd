"""The champion/challenger gate: promote a challenger only on significant evidence.

A challenger is compared with the champion on labelled data neither has trained on.
Classifiers are compared with the exact McNemar test on the discordant pairs, regressors
with a paired bootstrap of the squared errors. The challenger is promoted only when at
least ``min_samples`` labels were compared, its relative gain reaches ``min_gain``, the
difference is significant at ``alpha`` and, when the caller passes predictions on the
trusted reference sample, it still agrees with the champion there (``min_retention``):
feedback alone, however much of it, cannot teach the model to forget what it knew.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array, Task

__all__ = [
    "GateConfig",
    "Verdict",
    "agreement",
    "judge",
    "mcnemar_exact",
    "paired_bootstrap",
    "relative_gain",
    "row_losses",
    "score",
]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null hypothesis each discordant pair goes either way with probability
    one half, so the p-value is ``min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Bin(b + c, 1/2)``
    (the same value as ``scipy.stats.binomtest(b, b + c, 0.5)``).
    """
    if b < 0 or c < 0:
        raise InvalidInput(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    if 2 * k >= n:
        return 1.0
    log_half_n = n * math.log(2.0)
    log_n_fact = math.lgamma(n + 1)
    logs = [
        log_n_fact - math.lgamma(i + 1) - math.lgamma(n - i + 1) - log_half_n for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * math.fsum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def paired_bootstrap(
    loss_champion: Array,
    loss_challenger: Array,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
) -> float:
    """One-sided bootstrap p-value that the challenger is *not* better (lower mean loss).

    The per-row loss differences are resampled with replacement; the p-value is the
    share of resampled means at or below zero, with the usual ``+1`` correction.
    """
    old = _as_float(loss_champion, "loss_champion")
    new = _as_float(loss_challenger, "loss_challenger")
    if old.shape != new.shape:
        raise InvalidInput(
            f"paired losses need the same shape, got {list(old.shape)} and {list(new.shape)}"
        )
    if old.size == 0:
        raise InvalidInput("paired_bootstrap needs at least one pair of losses")
    if n_resamples < 1:
        raise InvalidInput(f"n_resamples must be at least 1, got {n_resamples}")
    diff = old - new if old.ndim == 1 else (old - new).reshape(len(old), -1).mean(axis=1)
    rng = np.random.default_rng(seed)
    n = len(diff)
    chunk = max(1, 4_000_000 // n)
    at_or_below = 0
    done = 0
    while done < n_resamples:
        size = min(chunk, n_resamples - done)
        index = rng.integers(0, n, size=(size, n))
        at_or_below += int(np.count_nonzero(diff[index].mean(axis=1) <= 0.0))
        done += size
    return (at_or_below + 1) / (n_resamples + 1)


@dataclass(frozen=True, slots=True)
class GateConfig:
    """When a challenger may replace the champion.

    ``min_gain`` is relative: ``(new - old) / old`` on accuracy for classifiers, the
    relative RMSE reduction for regressors. ``min_retention`` applies only when the
    caller passes predictions on the reference sample (``None`` disables it).
    """

    min_gain: float = 0.01
    min_samples: int = 200
    alpha: float = 0.05
    min_retention: float | None = 0.95
    n_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise InvalidInput(f"min_samples must be at least 1, got {self.min_samples}")
        if not 0.0 < self.alpha < 1.0:
            raise InvalidInput(f"alpha must be in (0, 1), got {self.alpha}")
        if not math.isfinite(self.min_gain):
            raise InvalidInput(f"min_gain must be finite, got {self.min_gain}")
        if self.min_retention is not None and not 0.0 <= self.min_retention <= 1.0:
            raise InvalidInput(f"min_retention must be in [0, 1], got {self.min_retention}")
        if self.n_resamples < 1:
            raise InvalidInput(f"n_resamples must be at least 1, got {self.n_resamples}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gate's decision and the numbers behind it.

    ``champion`` and ``challenger`` are accuracies (classification) or RMSEs (regression)
    on the ``n`` compared labels; ``retention`` the challenger's agreement with the
    champion on the reference sample when it was checked.
    """

    promote: bool
    test: str
    n: int
    champion: float
    challenger: float
    gain: float
    p_value: float | None
    reason: str
    retention: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(task: Task, y_true: Array, y_pred: Array) -> float:
    """Accuracy for classifiers, RMSE for regressors."""
    truth, pred = _paired(task, y_true, y_pred, "predictions")
    if task == "classification":
        return float(np.mean(truth == pred))
    return float(np.sqrt(np.mean((truth - pred) ** 2)))


def relative_gain(task: Task, old: float, new: float) -> float:
    """``(new - old) / old`` on accuracy; the relative reduction of RMSE for regressors."""
    if task == "classification":
        if old == 0.0:
            return math.inf if new > 0.0 else 0.0
        return (new - old) / old
    if old == 0.0:
        return -math.inf if new > 0.0 else 0.0
    return (old - new) / old


def agreement(task: Task, champion_pred: Array, challenger_pred: Array) -> float:
    """How much the challenger still agrees with the champion (1 = identical).

    The share of equal classes for classifiers; ``1 - MSE / variance`` of the champion's
    outputs (an R² against the champion) for regressors.
    """
    old, new = _paired(task, champion_pred, challenger_pred, "reference predictions")
    if task == "classification":
        return float(np.mean(old == new))
    variance = float(np.var(old))
    mse = float(np.mean((old - new) ** 2))
    if variance == 0.0:
        return 1.0 if mse == 0.0 else 0.0
    return 1.0 - mse / variance


def judge(
    task: Task,
    y_true: Array,
    champion_pred: Array,
    challenger_pred: Array,
    config: GateConfig | None = None,
    *,
    reference: tuple[Array, Array] | None = None,
) -> Verdict:
    """Decide whether ``challenger_pred`` is better enough than ``champion_pred`` on ``y_true``.

    Predictions are class indices for classifiers and values for regressors, on labels
    neither model has trained on. ``reference`` optionally holds the champion's and the
    challenger's predictions on the trusted reference sample.
    """
    config = config or GateConfig()
    if task not in ("classification", "regression"):
        raise InvalidInput(f"the gate judges classification or regression models, not {task!r}")
    truth, old = _paired(task, y_true, champion_pred, "champion predictions")
    _, new = _paired(task, y_true, challenger_pred, "challenger predictions")
    n = len(truth)
    retention = agreement(task, *reference) if reference is not None else None
    if task == "classification":
        test = "mcnemar"
        old_ok = old == truth
        new_ok = new == truth
        champion = float(np.mean(old_ok)) if n else 0.0
        challenger = float(np.mean(new_ok)) if n else 0.0
        better = challenger > champion
        metric = "accuracy"
    else:
        test = "bootstrap"
        old_loss = row_losses(truth, old)
        new_loss = row_losses(truth, new)
        champion = float(np.sqrt(np.mean(old_loss))) if n else 0.0
        challenger = float(np.sqrt(np.mean(new_loss))) if n else 0.0
        better = challenger < champion
        metric = "RMSE"
    gain = relative_gain(task, champion, challenger)

    def verdict(promote: bool, p_value: float | None, reason: str) -> Verdict:
        return Verdict(promote, test, n, champion, challenger, gain, p_value, reason, retention)

    if n < config.min_samples:
        reason = f"too few labels compared: {n} < min_samples {config.min_samples}"
        return verdict(False, None, reason)
    p_value = paired_p_value(
        task, truth, old, new, n_resamples=config.n_resamples, seed=config.seed
    )
    summary = (
        f"{metric} {champion:.4f} -> {challenger:.4f} ({gain:+.2%}), "
        f"{test} p={p_value:.3g} on {n} labels"
    )
    if not better:
        reason = f"the challenger is not better: {summary}"
    elif gain < config.min_gain:
        reason = f"gain {gain:+.2%} below min_gain {config.min_gain:.2%}: {summary}"
    elif p_value >= config.alpha:
        reason = f"not significant at alpha {config.alpha}: {summary}"
    elif (
        retention is not None
        and config.min_retention is not None
        and retention < config.min_retention
    ):
        reason = (
            f"the challenger forgets the reference sample: agreement {retention:.3f} "
            f"< min_retention {config.min_retention}; {summary}"
        )
    else:
        return verdict(True, p_value, f"promote: {summary}")
    return verdict(False, p_value, reason)


def paired_p_value(
    task: Task, truth: Array, first: Array, second: Array, *, n_resamples: int, seed: int
) -> float:
    """The paired test the gate and the guard share, on two models' predictions of the
    same rows: exact McNemar on the rows only one of them got right (classification),
    else the one-sided bootstrap that ``second`` has no lower squared error."""
    if task == "classification":
        first_ok, second_ok = first == truth, second == truth
        b = int(np.count_nonzero(~first_ok & second_ok))
        c = int(np.count_nonzero(first_ok & ~second_ok))
        return mcnemar_exact(b, c)
    return paired_bootstrap(
        row_losses(truth, first), row_losses(truth, second), n_resamples=n_resamples, seed=seed
    )


def row_losses(truth: Array, pred: Array) -> Array:
    """Squared error per row (averaged over the outputs of a row)."""
    squared = (np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)) ** 2
    if squared.ndim > 1:
        squared = squared.reshape(squared.shape[0], -1).mean(axis=1)
    result: Array = squared
    return result


def _as_float(values: Array, what: str) -> Array:
    array: Array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise InvalidInput(f"{what} contain NaN or infinite values")
    return array


def _paired(task: Task, first: Array, second: Array, what: str) -> tuple[Array, Array]:
    """Validate two aligned arrays of labels/predictions and return them as numpy arrays."""
    a = np.asarray(first)
    b = np.asarray(second)
    if a.ndim == 0 or b.ndim == 0:
        raise InvalidInput(f"{what}: expected arrays with one row per label, got scalars")
    if task == "classification":
        if a.ndim != 1 or b.ndim != 1:
            raise InvalidInput(
                f"{what}: classification needs 1-d arrays of class indices, "
                f"got shapes {list(a.shape)} and {list(b.shape)}"
            )
        for array in (a, b):
            if array.dtype.kind == "f" and not (
                np.all(np.isfinite(array)) and np.all(array == np.floor(array))
            ):
                raise InvalidInput(f"{what}: class indices must be whole numbers")
            if array.dtype.kind not in "iuf":
                raise InvalidInput(f"{what}: class indices must be numbers, got {array.dtype}")
        a = a.astype(np.int64)
        b = b.astype(np.int64)
    else:
        a = _as_float(a, what)
        b = _as_float(b, what)
    if a.shape != b.shape:
        raise InvalidInput(
            f"{what}: expected the shape of the labels {list(a.shape)}, got {list(b.shape)}"
        )
    return a, b
