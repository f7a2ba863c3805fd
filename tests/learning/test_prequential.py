from __future__ import annotations

import math

import numpy as np
import pytest

from torchops.errors import InvalidInput
from torchops.learning.prequential import Prequential


def test_accuracy_over_time_and_after_a_point() -> None:
    score = Prequential(window=4)
    assert math.isnan(score.value)
    truth = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    pred = np.array([0, 1, 2, 3, 9, 9, 2, 9, 0, 9])
    score.update(truth[:3], pred[:3])
    for i in range(3, 10):
        score.update(truth[i], pred[i])
    assert score.n == 10
    assert score.value == pytest.approx(6 / 10)
    assert score.curve() == [(4, 1.0), (8, 0.25)]
    assert score.after(4) == pytest.approx(2 / 6)
    assert score.after(4, within=4) == pytest.approx(1 / 4)
    assert score.between(0, 4) == 1.0
    assert math.isnan(score.after(10))


def test_regression_scores_rmse() -> None:
    score = Prequential(task="regression", window=2)
    score.update(np.array([0.0, 0.0, 0.0, 0.0]), np.array([1.0, 1.0, 3.0, 3.0]))
    assert score.curve() == [(2, 1.0), (4, 3.0)]
    assert score.value == pytest.approx(math.sqrt(5.0))


def test_bad_input() -> None:
    score = Prequential()
    with pytest.raises(InvalidInput):
        score.update(np.array([1, 2]), np.array([1]))
    with pytest.raises(InvalidInput):
        Prequential(window=0)
    assert score.n == 0
