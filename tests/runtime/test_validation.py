"""The shared input validation and its casting rule, without any model."""

from __future__ import annotations

import numpy as np
import pytest

from torchops.errors import InvalidInput
from torchops.runtime.validation import validate_input, validate_inputs
from torchops.types import Signature, TensorSpec

FLOAT = TensorSpec("x", "float32", (-1, 3))
INT32 = TensorSpec("ids", "int32", (-1,))
FLAG = TensorSpec("mask", "bool", (-1, 2))


def test_matching_array_passes_without_copy() -> None:
    array = np.zeros((2, 3), dtype=np.float32)
    assert validate_input(FLOAT, array) is array


def test_non_contiguous_array_is_made_contiguous() -> None:
    array = np.zeros((3, 2), dtype=np.float32).T
    out = validate_input(FLOAT, array)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("dtype", ["float64", "float16", "int64", "int8", "uint16"])
def test_float_input_accepts_numbers(dtype: str) -> None:
    array = np.arange(6).reshape(2, 3).astype(dtype)
    out = validate_input(FLOAT, array)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))


def test_lists_are_accepted() -> None:
    assert validate_input(FLOAT, [[1, 2, 3]]).dtype == np.float32


@pytest.mark.parametrize("value", [[[True, False, True]], [["a", "b", "c"]]])
def test_float_input_refuses_bool_and_str(value: list[list[object]]) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': expected shape \[-1, 3\] float32"):
        validate_input(FLOAT, value)


def test_int_input_takes_ints_that_fit() -> None:
    out = validate_input(INT32, np.array([1, 2**31 - 1], dtype=np.int64))
    assert out.dtype == np.int32
    assert out.tolist() == [1, 2**31 - 1]


def test_int_input_refuses_ints_that_do_not_fit() -> None:
    with pytest.raises(InvalidInput, match=r"values \[1, 2147483648\] do not fit int32"):
        validate_input(INT32, np.array([1, 2**31], dtype=np.int64))


def test_int_input_refuses_floats_even_when_whole() -> None:
    with pytest.raises(InvalidInput, match="float64 does not convert to int32"):
        validate_input(INT32, np.array([1.0, 2.0]))


def test_bool_input_takes_bool_only() -> None:
    assert validate_input(FLAG, np.ones((1, 2), dtype=bool)).dtype == np.bool_
    with pytest.raises(InvalidInput, match="'mask'"):
        validate_input(FLAG, np.ones((1, 2), dtype=np.int64))


@pytest.mark.parametrize("shape", [(2,), (2, 4), (2, 3, 1)])
def test_shape_errors_name_input_expected_and_got(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_input(FLOAT, np.zeros(shape, dtype=np.float32))
    assert str(err.value) == (
        f"input 'x': expected shape [-1, 3] float32, got {list(shape)} float32"
    )


def test_fixed_leading_dimension_is_checked() -> None:
    spec = TensorSpec("table", "float32", (4, 2))
    validate_input(spec, np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(InvalidInput, match=r"\[4, 2\]"):
        validate_input(spec, np.zeros((3, 2), dtype=np.float32))


def test_inputs_must_be_a_mapping_with_the_signature_names() -> None:
    sig = Signature((FLOAT, INT32), ())
    good = {"x": np.zeros((2, 3), np.float32), "ids": np.zeros(2, np.int32)}
    arrays = validate_inputs(sig, good)
    assert [a.shape for a in arrays] == [(2, 3), (2,)]
    with pytest.raises(InvalidInput, match="mapping"):
        validate_inputs(sig, [good["x"], good["ids"]])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"missing input 'ids' \(expected shape \[-1\] int32\)"):
        validate_inputs(sig, {"x": good["x"]})
    with pytest.raises(InvalidInput, match="unexpected input 'y'"):
        validate_inputs(sig, {**good, "y": good["x"]})
    with pytest.raises(InvalidInput, match="'x' has 2 rows, 'ids' has 3"):
        validate_inputs(sig, {"x": good["x"], "ids": np.zeros(3, np.int32)})
