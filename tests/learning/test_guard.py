from __future__ import annotations

import numpy as np
import pytest

from torchops.errors import InvalidInput
from torchops.learning.gate import mcnemar_exact
from torchops.learning.guard import GuardConfig, check_rollback


def window(both: int, parent_only: int, new_only: int, neither: int) -> tuple[np.ndarray, ...]:
    n = both + parent_only + new_only + neither
    y = np.arange(n) % 7
    wrong = (y + 3) % 7
    k1, k2, k3 = both, both + parent_only, both + parent_only + new_only
    parent = np.concatenate([y[:k1], y[k1:k2], wrong[k2:k3], wrong[k3:]])
    new = np.concatenate([y[:k1], wrong[k1:k2], y[k2:k3], wrong[k3:]])
    return y, new, parent


def test_a_significant_drop_rolls_back() -> None:
    y, new, parent = window(both=150, parent_only=40, new_only=5, neither=5)
    decision = check_rollback("classification", y, new, parent, GuardConfig(min_samples=200))
    assert decision.rollback and decision.settled
    assert decision.parent == pytest.approx(190 / 200)
    assert decision.new == pytest.approx(155 / 200)
    assert decision.drop == pytest.approx((190 - 155) / 190)
    assert decision.p_value == pytest.approx(mcnemar_exact(5, 40))
    assert "roll back" in decision.reason


def test_a_small_or_insignificant_drop_keeps_the_version() -> None:
    y, new, parent = window(both=180, parent_only=6, new_only=3, neither=11)
    decision = check_rollback("classification", y, new, parent)
    assert decision.settled and not decision.rollback
    assert decision.drop > 0
    # a better new version is kept too
    y, new, parent = window(both=150, parent_only=5, new_only=40, neither=5)
    assert not check_rollback("classification", y, new, parent).rollback


def test_too_few_labels_keeps_watching() -> None:
    y, new, parent = window(both=10, parent_only=40, new_only=0, neither=0)
    decision = check_rollback("classification", y, new, parent, GuardConfig(min_samples=200))
    assert not decision.rollback and not decision.settled
    assert decision.p_value is None


def test_regression_rollback() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=300)
    parent = y + rng.normal(scale=0.3, size=300)
    new = y + rng.normal(scale=1.0, size=300)
    decision = check_rollback("regression", y, new, parent)
    assert decision.rollback and decision.test == "bootstrap"
    assert decision.new > decision.parent
    assert not check_rollback("regression", y, parent, new).rollback


def test_bad_input() -> None:
    with pytest.raises(InvalidInput):
        check_rollback("classification", np.zeros(3), np.zeros(2), np.zeros(3))
    with pytest.raises(InvalidInput):
        GuardConfig(max_drop=1.5)
