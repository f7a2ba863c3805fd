from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
)

from torchops.errors import InvalidInput
from torchops.monitoring.quality import ClassificationQuality, RegressionQuality, make_quality
from torchops.types import Array, Signature, TensorSpec

from ._digits import SIGNATURE, digits

K = 4
LABELS = ("cat", "dog", "fox", "owl")


def _expected(y_true: Array, y_pred: Array, proba: Array | None) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    per_class = precision_recall_fscore_support(
        y_true, y_pred, labels=range(K), average=None, zero_division=0
    )
    expected = {
        "count": float(len(y_true)),
        "accuracy": accuracy_score(y_true, y_pred),
        "precision_macro": precision,
        "recall_macro": recall,
        "f1_macro": f1,
    }
    for i, name in enumerate(LABELS):
        expected[f"precision[{name}]"] = per_class[0][i]
        expected[f"recall[{name}]"] = per_class[1][i]
        expected[f"f1[{name}]"] = per_class[2][i]
    if proba is not None:
        expected["log_loss"] = log_loss(y_true, y_proba=proba, labels=range(K))
    return expected


def _check(quality: ClassificationQuality, y_true: Array, y_pred: Array, proba: Array) -> None:
    got = quality.metrics(now=1e9)
    assert got.keys() == _expected(y_true, y_pred, proba).keys()
    for key, value in _expected(y_true, y_pred, proba).items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    np.testing.assert_array_equal(
        quality.confusion(), confusion_matrix(y_true, y_pred, labels=range(K))
    )
    assert quality.count == len(y_true)


def _stream(seed: int, n: int = 600) -> tuple[Array, Array, Array]:
    rng = np.random.default_rng(seed)
    y_true = rng.choice(K, n, p=[0.5, 0.3, 0.15, 0.05])
    proba = rng.dirichlet(np.ones(K), n)
    proba[np.arange(n), y_true] += rng.random(n)
    proba /= proba.sum(axis=1, keepdims=True)
    return y_true, proba.argmax(axis=1), proba


def _batches(seed: int, n: int) -> list[slice]:
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), 25, replace=False))
    bounds = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def test_cumulative_metrics_match_sklearn() -> None:
    y_true, y_pred, proba = _stream(0)
    quality = ClassificationQuality(K, LABELS)
    for part in _batches(1, len(y_true)):
        quality.update(y_true[part], y_pred[part], proba[part])
        _check(quality, y_true[: part.stop], y_pred[: part.stop], proba[: part.stop])


def test_last_n_window_evicts_exactly_the_oldest_rows() -> None:
    y_true, y_pred, proba = _stream(2)
    quality = ClassificationQuality(K, LABELS, window=37)
    for part in _batches(3, len(y_true)):
        quality.update(y_true[part], y_pred[part], proba[part])
        keep = slice(max(0, part.stop - 37), part.stop)
        _check(quality, y_true[keep], y_pred[keep], proba[keep])
    assert quality.count == 37


def test_last_seconds_window_follows_prediction_times_even_out_of_order() -> None:
    y_true, y_pred, proba = _stream(4)
    rng = np.random.default_rng(5)
    at = 1e9 - 2000 + np.cumsum(rng.random(len(y_true)) * 3)
    # late feedback: the batches arrive shuffled, rows inside them too
    parts = _batches(6, len(y_true))
    rng.shuffle(parts)
    quality = ClassificationQuality(K, LABELS, window_seconds=120.0)
    seen = np.zeros(len(y_true), dtype=bool)
    for part in parts:
        order = rng.permutation(np.arange(part.start, part.stop))
        quality.update(y_true[order], y_pred[order], proba[order], at=at[order])
        seen[order] = True
        keep = seen & (at >= at[seen].max() - 120.0)
        _check_at(quality, y_true[keep], y_pred[keep], proba[keep], now=at[seen].max())
    # time passes with no labels: the window drains
    last = float(at.max())
    keep = at >= last + 60 - 120
    _check_at(quality, y_true[keep], y_pred[keep], proba[keep], now=last + 60)
    assert quality.metrics(now=last + 121) == {"count": 0.0}
    assert quality.count == 0


def _check_at(
    quality: ClassificationQuality, y_true: Array, y_pred: Array, proba: Array, now: float
) -> None:
    got = quality.metrics(now=now)
    for key, value in _expected(y_true, y_pred, proba).items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert quality.count == len(y_true)


def test_log_loss_only_over_rows_with_probabilities() -> None:
    y_true, y_pred, proba = _stream(7, 100)
    quality = ClassificationQuality(K)
    quality.update(y_true[:60], y_pred[:60], proba[:60])
    quality.update(y_true[60:], y_pred[60:])
    got = quality.metrics()
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert got["log_loss"] == pytest.approx(
        log_loss(y_true[:60], y_proba=proba[:60], labels=range(K))
    )
    assert "precision[0]" in got
    without = ClassificationQuality(K)
    without.update(y_true, y_pred)
    assert "log_loss" not in without.metrics()


def test_digits_classifier_quality_matches_offline_metrics() -> None:
    data = digits()
    proba = data.proba(data.x_test)
    predicted = proba.argmax(axis=1)
    quality = make_quality(SIGNATURE)
    assert isinstance(quality, ClassificationQuality) and quality.n_classes == 10
    for start in range(0, len(predicted), 64):
        part = slice(start, start + 64)
        quality.update(data.y_test[part], predicted[part], proba[part])
    got = quality.metrics()
    assert got["accuracy"] == pytest.approx(accuracy_score(data.y_test, predicted))
    assert got["accuracy"] > 0.8
    _, _, f1, _ = precision_recall_fscore_support(data.y_test, predicted, average="macro")
    assert got["f1_macro"] == pytest.approx(f1)
    assert got["log_loss"] == pytest.approx(log_loss(data.y_test, y_proba=proba, labels=range(10)))


@pytest.mark.parametrize("window", [{}, {"window": 50}, {"window_seconds": 30.0}])
def test_regression_metrics_match_sklearn(window: dict[str, float]) -> None:
    rng = np.random.default_rng(8)
    y_true = rng.normal(size=(400, 2)) * 10
    y_pred = y_true + rng.normal(size=(400, 2)) * np.linspace(0.1, 5, 400)[:, None]
    at = 1e9 + np.arange(400) * 0.5
    quality = RegressionQuality(**window)  # type: ignore[arg-type]
    for part in _batches(9, 400):
        quality.update(y_true[part], y_pred[part], at=at[part])
        keep = np.zeros(400, dtype=bool)
        keep[: part.stop] = True
        if "window" in window:
            keep[: max(0, part.stop - 50)] = False
        if "window_seconds" in window:
            keep &= at >= at[part.stop - 1] - 30.0
        got = quality.metrics(now=float(at[part.stop - 1]))
        mse = mean_squared_error(y_true[keep], y_pred[keep])
        assert got["count"] == keep.sum()
        assert got["mse"] == pytest.approx(mse, rel=1e-9)
        assert got["rmse"] == pytest.approx(math.sqrt(mse), rel=1e-9)
        assert got["mae"] == pytest.approx(mean_absolute_error(y_true[keep], y_pred[keep]))


def test_make_quality_follows_the_signature() -> None:
    regression = Signature(
        inputs=(TensorSpec("x", "float32", (-1, 3)),),
        outputs=(TensorSpec("y", "float32", (-1, 1)),),
        task="regression",
    )
    assert isinstance(make_quality(regression, window=10), RegressionQuality)
    unlabelled = Signature(
        inputs=regression.inputs,
        outputs=(TensorSpec("p", "float32", (-1, 5)),),
        task="classification",
    )
    quality = make_quality(unlabelled, window_seconds=60.0)
    assert isinstance(quality, ClassificationQuality)
    assert (quality.n_classes, quality.window_seconds) == (5, 60.0)


def test_bad_updates_change_nothing() -> None:
    quality = ClassificationQuality(K, LABELS, window=10)
    quality.update(np.array([0, 1]), np.array([0, 0]))
    before = quality.metrics()
    bad: list[tuple[dict[str, Array], str]] = [
        ({"y_true": np.array([0, 4]), "y_pred": np.array([0, 0])}, "outside 0..3"),
        ({"y_true": np.array([0, 1]), "y_pred": np.array([0])}, "2 true classes but 1"),
        ({"y_true": np.array([0.5]), "y_pred": np.array([0])}, "whole class indices"),
        (
            {"y_true": np.array([0]), "y_pred": np.array([0]), "proba": np.ones((1, 3)) / 3},
            r"proba: expected shape \[1, 4\]",
        ),
        (
            {"y_true": np.array([0]), "y_pred": np.array([0]), "proba": np.full((1, 4), 2.0)},
            r"probabilities in \[0, 1\]",
        ),
        (
            {"y_true": np.array([0]), "y_pred": np.array([0]), "at": np.array([np.nan])},
            "finite unix time",
        ),
    ]
    for kwargs, message in bad:
        with pytest.raises(InvalidInput, match=message):
            quality.update(**kwargs)
    assert quality.metrics() == before and quality.count == 2
    regression = RegressionQuality()
    with pytest.raises(InvalidInput, match="same shape"):
        regression.update(np.zeros(3), np.zeros(4))
    with pytest.raises(InvalidInput, match="finite"):
        regression.update(np.array([np.inf]), np.zeros(1))
    assert regression.metrics() == {"count": 0.0}
    with pytest.raises(InvalidInput, match="not both"):
        ClassificationQuality(K, window=5, window_seconds=5.0)
    with pytest.raises(InvalidInput, match="at least 1 row"):
        RegressionQuality(window=0)
    with pytest.raises(InvalidInput, match="3 labels for 4 classes"):
        ClassificationQuality(K, LABELS[:3])
