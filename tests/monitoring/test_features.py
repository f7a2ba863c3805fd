from __future__ import annotations

import numpy as np
import pytest

from torchops.errors import InvalidInput
from torchops.monitoring.features import extract, feature_names, reduction
from torchops.types import Signature, TensorSpec

from ._digits import SIGNATURE, digits


def _signature(*specs: tuple[str, str, tuple[int, ...]]) -> Signature:
    return Signature(
        inputs=tuple(TensorSpec(*spec) for spec in specs),
        outputs=(TensorSpec("output", "float32", (-1, 1)),),
    )


def test_small_inputs_are_one_feature_per_element() -> None:
    data = digits()
    names = feature_names(SIGNATURE)
    assert names == [f"x[{i}]" for i in range(64)]
    matrix = extract(SIGNATURE, {"x": data.x_test})
    assert matrix.dtype == np.float64 and matrix.shape == (len(data.x_test), 64)
    np.testing.assert_array_equal(matrix, data.x_test.astype(np.float64))
    assert reduction(SIGNATURE) == "x: elements"


def test_scalar_rows_and_multi_dim_rows_flatten_in_c_order() -> None:
    signature = _signature(("age", "int64", (-1,)), ("grid", "float32", (-1, 2, 3)))
    assert feature_names(signature) == ["age"] + [f"grid[{i}]" for i in range(6)]
    age = np.array([30, 41], dtype=np.int64)
    grid = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    matrix = extract(signature, {"grid": grid, "age": age})
    np.testing.assert_array_equal(matrix[:, 0], [30.0, 41.0])
    np.testing.assert_array_equal(matrix[1, 1:], np.arange(6, 12))


def test_images_reduce_to_per_channel_mean_and_std() -> None:
    signature = _signature(("image", "float32", (-1, 3, 16, 16)))
    names = feature_names(signature)
    assert names == [f"image.mean[{c}]" for c in range(3)] + [f"image.std[{c}]" for c in range(3)]
    images = np.random.default_rng(0).normal(size=(5, 3, 16, 16)).astype(np.float32)
    images[:, 1] += 4.0
    matrix = extract(signature, {"image": images})
    assert matrix.shape == (5, 6)
    expected_mean = images.astype(np.float64).mean(axis=(2, 3))
    expected_std = images.astype(np.float64).std(axis=(2, 3))
    np.testing.assert_allclose(matrix[:, :3], expected_mean, rtol=1e-12)
    np.testing.assert_allclose(matrix[:, 3:], expected_std, rtol=1e-12)
    assert reduction(signature) == "image: channels"


def test_big_vectors_and_variable_rows_reduce_to_row_mean_and_std() -> None:
    signature = _signature(("wide", "float32", (-1, 300)), ("seq", "float32", (-1, -1)))
    assert feature_names(signature) == ["wide.mean", "wide.std", "seq.mean", "seq.std"]
    wide = np.random.default_rng(1).random((4, 300)).astype(np.float32)
    seq = np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]] * 2, dtype=np.float32)
    matrix = extract(signature, {"wide": wide, "seq": seq})
    np.testing.assert_allclose(matrix[:, 0], wide.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(matrix[:, 1], wide.std(axis=1), rtol=1e-5)
    np.testing.assert_allclose(matrix[:2, 2:], [[3.0, np.sqrt(8 / 3)], [2.0, 0.0]])


def test_exactly_256_values_stay_elementwise() -> None:
    signature = _signature(("x", "float32", (-1, 16, 16)))
    assert len(feature_names(signature)) == 256
    assert len(feature_names(_signature(("x", "float32", (-1, 257))))) == 2


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing input 'x'"),
        ({"x": np.zeros((2, 64)), "y": np.zeros((2, 1))}, "unknown input 'y'"),
        ({"x": np.zeros((2, 63))}, "input 'x': expected shape [-1, 64], got [2, 63]"),
        ({"x": np.zeros(64)}, "expected shape [-1, 64], got [64]"),
        ({"x": np.array([["a"] * 64])}, "expected numbers"),
    ],
)
def test_bad_inputs_are_named(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        extract(SIGNATURE, inputs)


def test_inputs_with_different_row_counts_are_refused() -> None:
    signature = _signature(("a", "float32", (-1,)), ("b", "float32", (-1,)))
    with pytest.raises(InvalidInput, match="'b' has 3 rows, the others have 2"):
        extract(signature, {"a": np.zeros(2), "b": np.zeros(3)})


def test_no_rows_give_an_empty_matrix() -> None:
    signature = _signature(("x", "float32", (-1, 4)), ("image", "float32", (-1, 3, 20, 20)))
    matrix = extract(signature, {"x": np.zeros((0, 4)), "image": np.zeros((0, 3, 20, 20))})
    assert matrix.shape == (0, 10)
