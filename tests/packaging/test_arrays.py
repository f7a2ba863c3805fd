"""Named arrays as safetensors bytes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from torchops.errors import InvalidInput
from torchops.packaging import decode_arrays, encode_arrays


def test_round_trip_keeps_values_dtypes_and_names() -> None:
    arrays = {
        "x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(3, 2),
        "mask": np.array([True, False, True]),
        "half": np.ones(2, dtype=np.float16),
        "strided": np.arange(12.0).reshape(3, 4).T,
    }
    back = decode_arrays(encode_arrays(arrays))
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)
        assert back[name].flags.writeable


@pytest.mark.parametrize("value", [np.array(["a"]), np.array([object()]), np.array([1j])])
def test_non_numeric_arrays_are_refused(value: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match="only numbers"):
        encode_arrays({"v": value})


@pytest.mark.parametrize("data", [b"", b"garbage", pickle.dumps({"x": np.zeros(2)})])
def test_garbage_is_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="not a safetensors"):
        decode_arrays(data)
