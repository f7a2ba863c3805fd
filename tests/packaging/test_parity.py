"""The parity comparison behind every export report."""

from __future__ import annotations

import numpy as np

from torchops.packaging.parity import compare


def test_identical_outputs_pass_with_zero_diff() -> None:
    a = np.array([[1.0, -2.0]], dtype=np.float32)
    result = compare(["y"], [a], [a.copy()])
    assert (result.ok, result.max_abs, result.max_rel, result.problem) == (True, 0.0, 0.0, None)


def test_tolerance_is_absolute_plus_relative() -> None:
    want = np.array([100.0, 0.0])
    inside = compare(["y"], [want], [np.array([100.09, 5e-5])], atol=1e-4, rtol=1e-3)
    assert inside.ok
    assert np.isclose(inside.max_abs, 0.09)
    outside = compare(["y"], [want], [np.array([100.2, 0.0])], atol=1e-4, rtol=1e-3)
    assert not outside.ok
    assert outside.problem is not None and "output 'y'" in outside.problem
    assert "1 of 2 values" in outside.problem


def test_relative_diff_is_floored_at_atol() -> None:
    result = compare(["y"], [np.array([0.0])], [np.array([1e-5])], atol=1e-4, rtol=0.0)
    assert result.ok
    assert np.isclose(result.max_rel, 0.1)


def test_nan_matches_nan_only() -> None:
    nan = np.array([np.nan, 1.0])
    assert compare(["y"], [nan], [nan.copy()]).ok
    result = compare(["y"], [np.array([0.0, 1.0])], [nan])
    assert not result.ok
    assert result.problem is not None and "NaN/inf" in result.problem


def test_shape_dtype_and_count_mismatches() -> None:
    a = np.zeros((2, 3), dtype=np.float32)
    assert "is [3, 2]" in (compare(["y"], [a], [a.T.copy()]).problem or "")
    assert "float64" in (compare(["y"], [a], [a.astype(np.float64)]).problem or "")
    assert not compare(["y", "z"], [a, a], [a]).ok


def test_integer_outputs_compare_exactly() -> None:
    a = np.array([1, 2, 3])
    assert compare(["label"], [a], [a.copy()], atol=0, rtol=0).ok
    assert not compare(["label"], [a], [np.array([1, 2, 4])], atol=0.5, rtol=0).ok
