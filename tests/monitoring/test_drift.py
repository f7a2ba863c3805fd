from __future__ import annotations

import math
from functools import cache

import numpy as np
import orjson
import pytest

from torchops.errors import InvalidInput
from torchops.monitoring.drift import (
    EPSILON,
    DriftConfig,
    DriftReport,
    DriftWindow,
    js_distance,
    psi,
)
from torchops.monitoring.profiles import Profile, build_profile
from torchops.types import Array, Signature, TensorSpec

from ._digits import SIGNATURE, digits

TWO = Signature(
    inputs=(TensorSpec("x", "float64", (-1, 2)),),
    outputs=(TensorSpec("y", "float64", (-1, 1)),),
    task="regression",
)


@cache
def _profile() -> Profile:
    data = digits()
    return build_profile(SIGNATURE, {"x": data.x_train}, {"output": data.proba(data.x_train)})


def _report(x: Array, **config: float) -> DriftReport:
    window = DriftWindow(_profile())
    window.add(x, digits().proba(x))
    return window.report(DriftConfig(**config))  # type: ignore[arg-type]


def _bootstrap(x: Array, n: int, seed: int) -> Array:
    """``n`` rows: distinct rows of ``x`` when it has that many (small windows: the KS test
    wants independent rows), else drawn with replacement (large windows)."""
    if n <= len(x):
        return x[np.random.default_rng(seed).permutation(len(x))[:n]]
    return x[np.random.default_rng(seed).integers(0, len(x), n)]


def _constant() -> list[int]:
    data = digits()
    return [i for i in range(64) if np.ptp(data.x_train[:, i]) == 0]


def test_clean_small_windows_do_not_drift() -> None:
    x = digits().x_test
    flagged = 0
    windows = [x[start : start + 100] for start in range(0, 500, 100)] + [x[:200], x[200:400]]
    for rows in windows:
        report = _report(rows)
        assert report.rows == len(rows) and len(report.features) == 64
        assert {f.method for f in report.features} == {"ks"}
        assert not report.dataset_drifted and report.drifted_share <= 2 / 64
        flagged += len(report.drifted_features)
        # pixels always 0 in training that stay 0 are never suspect
        for i in _constant():
            if np.all(rows[:, i] == 0):
                assert report.features[i].p_value == 1.0 and report.features[i].psi == 0.0
        assert report.prediction is not None and report.prediction.method == "chi2"
        assert not report.prediction.drifted
    # KS on 17-level pixels is conservative: far fewer false alarms than p = 0.05 allows
    assert flagged / (64 * len(windows)) < 0.02
    # and in windows of 200 rows, none at all
    assert _report(x[:200]).drifted_features == _report(x[200:400]).drifted_features == ()


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_large_windows_do_not_drift(seed: int) -> None:
    data = digits()
    for rows in (_bootstrap(data.x_test, 2000, seed), np.concatenate([data.x_test] * 2)):
        report = _report(rows)
        assert {f.method for f in report.features} == {"psi"}
        assert all(f.p_value is None for f in report.features)
        assert report.drifted_features == () and not report.dataset_drifted
        assert max(f.psi for f in report.features) < 0.1
        assert max(f.js for f in report.features) < 0.1
        assert report.prediction is not None and report.prediction.method == "psi"
        assert not report.prediction.drifted


@pytest.mark.parametrize("size", [200, 2000])
def test_inverted_intensities_drift(size: int) -> None:
    report = _report(16 - _bootstrap(digits().x_test, size, 3))
    assert report.dataset_drifted and report.drifted_share > 0.9
    # the pixels that were always 0 are now always 16: flagged
    assert all(report.features[i].drifted for i in _constant())
    assert max(f.psi for f in report.features) > 5
    assert report.prediction is not None and report.prediction.drifted


@pytest.mark.parametrize("size", [200, 2000])
def test_noise_drifts_the_noisy_pixels_only(size: int) -> None:
    data = digits()
    rows = _bootstrap(data.x_test, size, 4)
    rng = np.random.default_rng(5)
    noisy = np.arange(32)  # the top half of the image
    rows[:, noisy] = np.clip(rows[:, noisy] + rng.normal(0, 4, (size, 32)), 0, 16)
    report = _report(rows)
    drifted = {int(name[2:-1]) for name in report.drifted_features}
    assert len(drifted & set(noisy.tolist())) >= 20
    # the untouched bottom half: at most a chance false alarm or two
    assert len(drifted - set(noisy.tolist())) <= 2
    assert 0.3 < report.drifted_share < 0.55
    # noise over the whole image: the dataset drifts
    everywhere = np.clip(rows + rng.normal(0, 4, rows.shape), 0, 16)
    assert _report(everywhere).dataset_drifted


@pytest.mark.parametrize("size", [150, 2000])
def test_class_prior_change_drifts_predictions(size: int) -> None:
    data = digits()
    rows = data.x_test[np.isin(data.y_test, [0, 1, 2])]
    report = _report(_bootstrap(rows, size, 6))
    assert report.prediction is not None and report.prediction.drifted
    assert report.prediction.method == ("chi2" if size < 1000 else "psi")
    if report.prediction.p_value is not None:
        assert report.prediction.p_value < 1e-10
    assert report.prediction.psi > 1


def test_too_few_rows_give_no_verdict() -> None:
    report = _report(16 - digits().x_test[:29])
    assert report.rows == 29 and report.features == ()
    assert not report.dataset_drifted and report.drifted_share == 0.0
    assert report.prediction is None
    assert _report(16 - digits().x_test[:29], min_rows=10).dataset_drifted


def test_constant_features_drift_only_when_their_value_moves() -> None:
    x = np.zeros((500, 2))
    x[:, 0] = np.random.default_rng(0).normal(size=500)
    x[:, 1] = 7.0
    profile = build_profile(TWO, {"x": x})
    for rows, large in ((x[:100], False), (np.concatenate([x] * 4), True)):
        window = DriftWindow(profile)
        window.add(rows)
        same = window.report().features[1]
        assert not same.drifted and same.psi == 0.0 and same.js == 0.0
        for value in (6.9, 7.1):
            moved = rows.copy()
            moved[:, 1] = value
            window = DriftWindow(profile)
            window.add(moved)
            feature = window.report().features[1]
            assert feature.drifted and feature.method == ("psi" if large else "ks")


def test_psi_and_js_by_hand() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([0.9, 0.1])) == pytest.approx(
        0.4 * math.log(1.8) - 0.4 * math.log(0.2)
    )
    # counts are normalised; an empty bin counts as EPSILON
    assert psi(np.array([50, 50, 0]), np.array([40, 40, 20])) == pytest.approx(
        2 * (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.2 - EPSILON) * math.log(0.2 / EPSILON)
    )
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    divergence = 0.5 * sum(p * np.log2(p / m)) + 0.5 * sum(q * np.log2(q / m))
    assert js_distance(p, q) == pytest.approx(math.sqrt(divergence))
    assert js_distance(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    assert psi(p, p) == 0.0 and js_distance(p, p) == 0.0


@pytest.mark.parametrize("nan", [False, True])
def test_features_score_as_each_feature_alone(nan: bool) -> None:
    """All features are scored at once (one KS call when the rows line up, one call per
    feature when a NaN makes their sizes differ): each score equals the feature's own."""
    from scipy.stats import ks_2samp

    profile = _profile()
    rows = np.vstack([digits().x_test[:100], 16 - digits().x_test[100:200]])
    if nan:
        rows[[3, 50], 20] = np.nan
    window = DriftWindow(profile)
    window.add(rows)
    report = window.report()
    counts = window.counts
    for i, (feature, drift) in enumerate(zip(profile.features, report.features, strict=True)):
        bins = len(feature.edges) + 1
        reference, live = np.asarray(feature.proportions), counts[i, :bins]
        values = rows[:, i][np.isfinite(rows[:, i])]
        assert values.size == (198 if nan and i == 20 else 200)
        p_value = float(ks_2samp(values, np.asarray(feature.sample)).pvalue)
        assert drift.psi == pytest.approx(psi(reference, live), rel=1e-12, abs=1e-15)
        assert drift.js == pytest.approx(js_distance(reference, live), rel=1e-12, abs=1e-15)
        assert drift.p_value == pytest.approx(p_value, rel=1e-12, abs=1e-300)
        assert drift.drifted == (p_value < 0.05)
    assert 0 < len(report.drifted_features) < 64


def test_windows_merge_and_keep_only_the_last_rows_for_ks() -> None:
    data = digits()
    profile = _profile()
    whole, left, right = DriftWindow(profile), DriftWindow(profile), DriftWindow(profile)
    whole.add(data.x_test)
    left.add(data.x_test[:200])
    right.add(data.x_test[200:])
    np.testing.assert_array_equal(left.counts + right.counts, whole.counts)
    # clean rows then shifted ones: the ring keeps the last 100, which KS sees
    window = DriftWindow(profile, max_rows=100)
    window.add(data.x_test[:300])
    window.add(16 - data.x_test[:60])
    window.add(16 - data.x_test[60:100])
    assert window.rows == 400
    assert window.report().dataset_drifted
    window.reset()
    assert window.rows == 0 and window.counts.sum() == 0
    window.add(data.x_test[:100])
    assert not window.report().dataset_drifted


def test_predictions_alone_are_scored_without_inputs() -> None:
    data = digits()
    window = DriftWindow(_profile())
    window.add(None, np.zeros(50, dtype=np.int64))
    report = window.report()
    assert report.rows == 0 and report.features == ()
    assert window.prediction_rows == 50
    assert report.prediction is not None and report.prediction.drifted
    window.add(None, data.proba(data.x_test[:10]))
    assert window.prediction_rows == 60


def test_bad_input_changes_nothing() -> None:
    data = digits()
    window = DriftWindow(_profile())
    with pytest.raises(InvalidInput, match="3 predictions for 10 rows"):
        window.add(data.x_test[:10], np.zeros(3, dtype=np.int64))
    with pytest.raises(InvalidInput, match=r"\[rows, 64\]"):
        window.add(data.x_test[:10, :5])
    with pytest.raises(InvalidInput, match=r"outside 0\.\.9"):
        window.add(data.x_test[:10], np.full(10, 12))
    assert window.rows == 0 and window.prediction_rows == 0 and window.counts.sum() == 0
    with pytest.raises(InvalidInput, match="psi_threshold"):
        DriftConfig(psi_threshold=-1)
    with pytest.raises(InvalidInput, match="min_rows"):
        DriftConfig(min_rows=0)
    with pytest.raises(InvalidInput, match="max_rows"):
        DriftWindow(_profile(), max_rows=0)


def test_report_to_dict_is_json() -> None:
    report = _report(digits().x_test[:100])
    data = orjson.loads(orjson.dumps(report.to_dict()))
    assert data["rows"] == 100 and len(data["features"]) == 64
    assert data["features"][0]["name"] == "x[0]" and data["features"][0]["method"] == "ks"
    assert data["prediction"]["name"] == "prediction"
