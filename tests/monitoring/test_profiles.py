from __future__ import annotations

import numpy as np
import pytest

from torchops.errors import InvalidInput, NotFound
from torchops.monitoring.features import extract
from torchops.monitoring.profiles import (
    SAMPLE_SIZE,
    Profile,
    bin_counts,
    build_profile,
    prediction_counts,
    prediction_values,
)
from torchops.types import Signature, TensorSpec

from ._digits import SIGNATURE, digits

REGRESSION = Signature(
    inputs=(TensorSpec("x", "float64", (-1, 2)),),
    outputs=(TensorSpec("y", "float64", (-1, 1)),),
    task="regression",
)


def _digits_profile() -> Profile:
    data = digits()
    return build_profile(SIGNATURE, {"x": data.x_train}, {"output": data.proba(data.x_train)})


def test_digits_profile_keeps_bins_shares_sample_and_moments() -> None:
    data = digits()
    profile = _digits_profile()
    assert profile.n_reference == len(data.x_train) and profile.bins == 10
    assert profile.task == "classification" and profile.reduction == "x: elements"
    assert [f.name for f in profile.features] == [f"x[{i}]" for i in range(64)]
    for i, feature in enumerate(profile.features):
        column = data.x_train[:, i].astype(np.float64)
        assert len(feature.proportions) == len(feature.edges) + 1
        assert sum(feature.proportions) == pytest.approx(1.0)
        # the open end bins hold only out-of-range values: none in the reference
        assert feature.proportions[0] == 0.0 and feature.proportions[-1] == 0.0
        assert feature.edges[-1] == column.max()
        assert feature.edges[0] < column.min() == feature.min
        assert (feature.mean, feature.max) == pytest.approx((column.mean(), column.max()))
        assert feature.std == pytest.approx(column.std())
        assert len(feature.sample) == SAMPLE_SIZE
        assert set(feature.sample) <= set(column.tolist())


def test_constant_pixels_get_bins_below_at_and_above_their_value() -> None:
    data = digits()
    profile = _digits_profile()
    constant = [i for i in range(64) if np.ptp(data.x_train[:, i]) == 0]
    assert constant, "digits has pixels that are always 0 in training"
    for i in constant:
        feature = profile.features[i]
        assert feature.edges == (np.nextafter(0.0, -1.0), 0.0)
        assert feature.proportions == (0.0, 1.0, 0.0)
    counts = bin_counts(profile, np.array([[-1.0] * 64, [0.0] * 64, [3.0] * 64]))
    for i in constant:
        assert counts[i, :3].tolist() == [1, 1, 1]


def test_inner_edges_are_reference_quantiles() -> None:
    values = np.random.default_rng(0).normal(size=(10_000, 2))
    profile = build_profile(REGRESSION, {"x": values}, bins=5)
    feature = profile.features[1]
    np.testing.assert_allclose(
        feature.edges[1:-1], np.quantile(values[:, 1], [0.2, 0.4, 0.6, 0.8]), rtol=1e-12
    )
    np.testing.assert_allclose(feature.proportions, [0, 0.2, 0.2, 0.2, 0.2, 0.2, 0], atol=1e-3)


def test_bin_counts_match_right_closed_digitize() -> None:
    data = digits()
    profile = _digits_profile()
    live = np.concatenate([data.x_test, 16 - data.x_test, data.x_test + 0.5])
    counts = bin_counts(profile, live)
    assert counts.dtype == np.int64 and counts.shape[0] == 64
    for i, feature in enumerate(profile.features):
        expected = np.bincount(
            np.digitize(live[:, i], feature.edges, right=True), minlength=len(feature.edges) + 1
        )
        assert counts[i, : len(expected)].tolist() == expected.tolist()
        assert counts[i, len(expected) :].sum() == 0


@pytest.mark.parametrize("seed", range(5))
def test_bin_counts_of_two_parts_add_up_to_the_whole(seed: int) -> None:
    data = digits()
    profile = _digits_profile()
    rng = np.random.default_rng(seed)
    rows = np.concatenate([data.x_test, rng.normal(8, 6, size=(200, 64))])
    rows[rng.random(rows.shape) < 0.01] = np.nan
    cut = int(rng.integers(0, len(rows) + 1))
    order = rng.permutation(len(rows))
    first, second = rows[order[:cut]], rows[order[cut:]]
    whole = bin_counts(profile, rows)
    np.testing.assert_array_equal(bin_counts(profile, first) + bin_counts(profile, second), whole)
    # NaN values are not counted; every other value lands in exactly one bin
    np.testing.assert_array_equal(whole.sum(axis=1), (~np.isnan(rows)).sum(axis=0))


def test_classifier_prediction_distribution_is_argmax_shares() -> None:
    data = digits()
    profile = _digits_profile()
    predicted = data.proba(data.x_train).argmax(axis=1)
    assert profile.prediction is not None and profile.prediction_edges is None
    np.testing.assert_allclose(
        profile.prediction, np.bincount(predicted, minlength=10) / len(predicted)
    )
    scores = data.proba(data.x_test)
    values = prediction_values(SIGNATURE, {"output": scores})
    np.testing.assert_array_equal(values, scores.argmax(axis=1))
    np.testing.assert_array_equal(
        prediction_counts(profile, values), np.bincount(values, minlength=10)
    )
    with pytest.raises(InvalidInput, match=r"outside 0\.\.9"):
        prediction_counts(profile, np.array([3, 10]))


def test_regression_prediction_distribution_is_binned() -> None:
    x = np.random.default_rng(2).normal(size=(1000, 2))
    y = x.sum(axis=1, keepdims=True)
    profile = build_profile(REGRESSION, {"x": x}, {"y": y})
    assert profile.prediction is not None and profile.prediction_edges is not None
    assert len(profile.prediction) == len(profile.prediction_edges) + 1
    counts = prediction_counts(profile, y)
    np.testing.assert_allclose(counts / 1000, profile.prediction)
    shifted = prediction_counts(profile, y + 100)
    assert shifted[-1] == 1000


def test_profile_round_trips_through_bytes() -> None:
    profile = _digits_profile()
    data = profile.to_bytes()
    assert isinstance(data, bytes)
    again = Profile.from_bytes(data)
    assert again == profile
    np.testing.assert_array_equal(
        bin_counts(again, digits().x_test), bin_counts(profile, digits().x_test)
    )
    assert again.feature("x[5]") == profile.features[5]
    with pytest.raises(NotFound, match="no feature 'x\\[64\\]'"):
        again.feature("x[64]")


@pytest.mark.parametrize("data", [b"not json", b"{}", b'{"format": "other"}', b"[1, 2]"])
def test_from_bytes_refuses_what_is_not_a_profile(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="not a torchops profile"):
        Profile.from_bytes(data)


def test_bad_arguments_are_refused() -> None:
    data = digits()
    with pytest.raises(InvalidInput, match="bins must be an integer"):
        build_profile(SIGNATURE, {"x": data.x_train}, bins=1)
    with pytest.raises(InvalidInput, match="no rows"):
        build_profile(SIGNATURE, {"x": np.zeros((0, 64), np.float32)})
    with pytest.raises(InvalidInput, match="the outputs have 3 rows"):
        build_profile(SIGNATURE, {"x": data.x_train}, {"output": np.zeros((3, 10))})
    with pytest.raises(InvalidInput, match="no 'output'"):
        build_profile(SIGNATURE, {"x": data.x_train}, {"scores": np.zeros((3, 10))})
    profile = _digits_profile()
    with pytest.raises(InvalidInput, match=r"expected a \[rows, 64\] feature matrix"):
        bin_counts(profile, extract(SIGNATURE, {"x": data.x_test})[:, :10])
