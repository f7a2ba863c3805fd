from __future__ import annotations

import math

import numpy as np
import pytest

from torchops.errors import InvalidInput
from torchops.learning.gate import (
    GateConfig,
    agreement,
    judge,
    mcnemar_exact,
    paired_bootstrap,
    relative_gain,
)


def outcomes(both: int, old_only: int, new_only: int, neither: int) -> tuple[np.ndarray, ...]:
    """Labels and two prediction vectors with the given (champion, challenger) correctness."""
    n = both + old_only + new_only + neither
    y = np.arange(n) % 10
    wrong = (y + 1) % 10
    old_right = np.repeat([True, True, False, False], [both, old_only, new_only, neither])
    new_right = np.repeat([True, False, True, False], [both, old_only, new_only, neither])
    return y, np.where(old_right, y, wrong), np.where(new_right, y, wrong)


def test_mcnemar_known_values() -> None:
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2**10, rel=1e-12)  # 0.001953125
    assert mcnemar_exact(10, 0) == pytest.approx(0.001953125, rel=1e-12)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 2**10, rel=1e-12)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 1) == 1.0


def test_mcnemar_matches_scipy_binomtest() -> None:
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(3, 12), (40, 20), (200, 150), (7, 8), (1000, 1100), (0, 25)]:
        expected = stats.binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)
        assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_mcnemar_refuses_negative_counts() -> None:
    with pytest.raises(InvalidInput):
        mcnemar_exact(-1, 3)


def test_paired_bootstrap_direction() -> None:
    rng = np.random.default_rng(0)
    old = rng.exponential(1.0, size=300)
    better = old * 0.7
    assert paired_bootstrap(old, better, seed=1) < 0.01
    assert paired_bootstrap(old, old, seed=1) == 1.0
    assert paired_bootstrap(better, old, seed=1) > 0.99
    with pytest.raises(InvalidInput):
        paired_bootstrap(old, old[:10])
    with pytest.raises(InvalidInput):
        paired_bootstrap(np.array([np.nan]), np.array([1.0]))


def test_judge_promotes_a_clearly_better_classifier() -> None:
    y, old, new = outcomes(both=170, old_only=5, new_only=85, neither=40)
    verdict = judge("classification", y, old, new, GateConfig(min_samples=200))
    assert verdict.promote, verdict.reason
    assert verdict.test == "mcnemar"
    assert verdict.n == 300
    assert verdict.champion == pytest.approx(175 / 300)
    assert verdict.challenger == pytest.approx(255 / 300)
    assert verdict.gain == pytest.approx((255 - 175) / 175)
    assert verdict.p_value == pytest.approx(mcnemar_exact(85, 5))
    assert verdict.to_dict()["promote"] is True


def test_judge_refuses_too_few_samples() -> None:
    y, old, new = outcomes(both=20, old_only=0, new_only=30, neither=0)
    verdict = judge("classification", y, old, new, GateConfig(min_samples=200))
    assert not verdict.promote
    assert verdict.p_value is None
    assert "too few" in verdict.reason


def test_judge_refuses_a_gain_below_min_gain_even_when_significant() -> None:
    # 90.0% -> 90.5% on 20,000 labels: 100 discordant pairs all one way (p tiny), gain 0.56%
    y, old, new = outcomes(both=18000, old_only=0, new_only=100, neither=1900)
    verdict = judge("classification", y, old, new, GateConfig(min_gain=0.01))
    assert verdict.p_value is not None and verdict.p_value < 1e-20
    assert 0 < verdict.gain < 0.01
    assert not verdict.promote
    assert "min_gain" in verdict.reason


def test_judge_refuses_an_insignificant_difference() -> None:
    y, old, new = outcomes(both=158, old_only=2, new_only=6, neither=34)
    verdict = judge("classification", y, old, new, GateConfig(min_samples=200))
    assert verdict.gain > 0.01
    assert verdict.p_value == pytest.approx(mcnemar_exact(6, 2))
    assert not verdict.promote
    assert "not significant" in verdict.reason


def test_judge_refuses_a_worse_challenger() -> None:
    y, old, new = outcomes(both=100, old_only=90, new_only=5, neither=5)
    verdict = judge("classification", y, old, new, GateConfig(min_samples=50))
    assert not verdict.promote
    assert verdict.gain < 0
    assert "not better" in verdict.reason


def test_judge_checks_retention_on_the_reference_sample() -> None:
    y, old, new = outcomes(both=170, old_only=5, new_only=85, neither=40)
    ref_old = np.arange(100) % 10
    ref_new = ref_old.copy()
    ref_new[:20] = (ref_new[:20] + 1) % 10  # 80% agreement
    verdict = judge("classification", y, old, new, reference=(ref_old, ref_new))
    assert verdict.retention == pytest.approx(0.8)
    assert not verdict.promote
    assert "forgets" in verdict.reason
    unchecked = judge(
        "classification", y, old, new, GateConfig(min_retention=None), reference=(ref_old, ref_new)
    )
    assert unchecked.promote


def test_judge_regression_uses_the_paired_bootstrap() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=400)
    old = y + rng.normal(scale=1.0, size=400)
    new = y + rng.normal(scale=0.5, size=400)
    verdict = judge("regression", y, old, new)
    assert verdict.test == "bootstrap"
    assert verdict.promote, verdict.reason
    assert verdict.challenger < verdict.champion  # RMSE
    assert verdict.gain == pytest.approx((verdict.champion - verdict.challenger) / verdict.champion)
    assert not judge("regression", y, new, old).promote


def test_judge_refuses_malformed_input() -> None:
    y = np.arange(300) % 10
    with pytest.raises(InvalidInput, match="shape"):
        judge("classification", y, y, y[:-1])
    with pytest.raises(InvalidInput, match="whole"):
        judge("classification", y, y, y + 0.5)
    with pytest.raises(InvalidInput):
        judge("regression", y.astype(float), y.astype(float), np.full(300, np.nan))
    with pytest.raises(InvalidInput):
        judge("other", y, y, y)
    with pytest.raises(InvalidInput):
        GateConfig(alpha=1.5)


def test_relative_gain_and_agreement() -> None:
    assert relative_gain("classification", 0.8, 0.9) == pytest.approx(0.125)
    assert relative_gain("classification", 0.0, 0.1) == math.inf
    assert relative_gain("regression", 2.0, 1.5) == pytest.approx(0.25)
    assert agreement("classification", np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    values = np.linspace(0, 1, 50)
    assert agreement("regression", values, values) == 1.0
    assert agreement("regression", values, values[::-1]) < 0
