"""OIP datatypes ↔ numpy/torch, JSON data and binary tensor data."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from torchops.errors import InvalidInput
from torchops.serving.datatypes import (
    DATATYPES,
    all_finite,
    array_from_binary,
    array_from_json,
    binary_data,
    datatype_of,
    deserialize_bytes,
    from_torch,
    json_data,
    numpy_dtype,
    serialize_bytes,
    to_torch,
    torch_dtype,
)

NUMERIC = [d for d in DATATYPES if d != "BYTES"]


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_mapping_agrees_with_tritonclient(datatype: str) -> None:
    assert numpy_dtype(datatype) == np.dtype(triton_to_np_dtype(datatype))
    assert datatype_of(numpy_dtype(datatype)) == datatype
    assert np_to_triton_dtype(numpy_dtype(datatype)) == datatype


def test_dtype_names_and_unsupported_types() -> None:
    assert datatype_of("float32") == "FP32"
    assert datatype_of("bfloat16") == "BF16"
    assert datatype_of(np.dtype(">f4")) == "FP32"
    assert datatype_of(np.dtype("U5")) == "BYTES"
    with pytest.raises(InvalidInput, match="complex64 has no Open Inference Protocol"):
        datatype_of(np.complex64)
    with pytest.raises(InvalidInput, match="unknown datatype 'FLOAT32'"):
        numpy_dtype("FLOAT32")


@pytest.mark.parametrize("datatype", NUMERIC)
def test_torch_dtypes_and_conversion(datatype: str) -> None:
    array = np.arange(6).reshape(2, 3).astype(numpy_dtype(datatype))
    tensor = to_torch(array)
    assert tensor.dtype == torch_dtype(datatype)
    back = from_torch(tensor)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back.astype(np.float64), array.astype(np.float64))


def test_bfloat16_round_trip_through_torch_is_exact() -> None:
    tensor = torch.tensor([[1.5, -2.25, 3.0e38]], dtype=torch.bfloat16)
    array = from_torch(tensor)
    assert array.dtype == np.dtype(ml_dtypes.bfloat16)
    assert torch.equal(to_torch(array), tensor)
    with pytest.raises(InvalidInput, match="BYTES has no torch dtype"):
        torch_dtype("BYTES")


@pytest.mark.parametrize("datatype", [d for d in NUMERIC if d != "BOOL"])
def test_json_flat_and_nested(datatype: str) -> None:
    expected = np.array([[0, 1, 2], [3, 4, 5]]).astype(numpy_dtype(datatype))
    flat = array_from_json([0, 1, 2, 3, 4, 5], datatype, [2, 3], name="x")
    nested = array_from_json([[0, 1, 2], [3, 4, 5]], datatype, [2, 3], name="x")
    for got in (flat, nested):
        assert got.dtype == expected.dtype
        assert got.shape == (2, 3)
        np.testing.assert_array_equal(got.astype(np.float64), expected.astype(np.float64))


def test_json_float_values_keep_precision() -> None:
    values = [0.1, -1e-30, 3.4e38, 12345.678]
    got = array_from_json(values, "FP32", [4], name="x")
    np.testing.assert_array_equal(got, np.array(values, dtype=np.float32))
    got64 = array_from_json(values, "FP64", [2, 2], name="x")
    np.testing.assert_array_equal(got64.reshape(-1), np.array(values))


def test_json_bool_and_bytes() -> None:
    got = array_from_json([True, False, True, True], "BOOL", [2, 2], name="b")
    np.testing.assert_array_equal(got, [[True, False], [True, True]])
    with pytest.raises(InvalidInput, match="BOOL data must be true or false"):
        array_from_json([1, 0], "BOOL", [2], name="b")
    text = array_from_json([["a", "bé"], ["", "d"]], "BYTES", [2, 2], name="s")
    assert text.tolist() == [[b"a", "bé".encode()], [b"", b"d"]]
    with pytest.raises(InvalidInput, match="BYTES data must be strings"):
        array_from_json(["a", 1], "BYTES", [2], name="s")


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "message"),
    [
        ([1.0, 2.0], "FP32", [1, 3], r"shape \[1, 3\] needs 3 values, data has 2"),
        ([[1.0, 2.0], [3.0, 4.0]], "FP32", [1, 4], r"nested as \[2, 2\] but shape is \[1, 4\]"),
        ([[1.0, 2.0], [3.0]], "FP32", [1, 3], "not a regular array"),
        (["1.5", "2"], "FP32", [2], "FP32 data must be numbers"),
        ([1.0, None], "FP32", [2], "FP32 data must be numbers"),
        ([1.5, 2.0], "INT32", [2], "INT32 data must be integers"),
        ([True, False], "INT64", [2], "INT64 data must be integers"),
        ([300, 1], "INT8", [2], "value 300 is out of range for INT8"),
        ([-1, 1], "UINT8", [2], "value -1 is out of range for UINT8"),
        ([2**70], "INT64", [1], "must be integers in range"),
        ({"a": 1}, "FP32", [1], "'data' must be a JSON array"),
    ],
)
def test_json_bad_data(data: Any, datatype: str, shape: list[int], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        array_from_json(data, datatype, shape, name="x")


def test_json_out_of_range_floats_are_nonfinite() -> None:
    # no numpy overflow warning escapes (warnings are errors in this suite)
    with pytest.raises(InvalidInput, match="out of range for FP32"):
        array_from_json([1e39, 1.0], "FP32", [2], name="x")
    with pytest.raises(InvalidInput, match="out of range for FP32"):
        array_from_json([[1e300, 2.0]], "FP32", [1, 2], name="x")
    with pytest.raises(InvalidInput, match="out of range for FP16"):
        array_from_json([70000.0], "FP16", [1], name="x")
    got = array_from_json([1e39, 1.0], "FP32", [2], name="x", reject_nonfinite=False)
    assert np.isinf(got[0]) and got[1] == 1.0
    with pytest.raises(InvalidInput, match="contains NaN or infinity"):
        array_from_json([float("nan")], "FP64", [1], name="x")
    nan = array_from_json([float("nan")], "FP32", [1], name="x", reject_nonfinite=False)
    assert np.isnan(nan[0])


@pytest.mark.parametrize("datatype", NUMERIC)
def test_binary_round_trip(datatype: str) -> None:
    rng = np.random.default_rng(1)
    source = (rng.standard_normal((2, 5)) * 50).astype(numpy_dtype(datatype))
    raw = binary_data(source, datatype)
    assert raw == source.tobytes()  # little-endian, row-major, BOOL one byte each
    got = array_from_binary(memoryview(raw), datatype, [2, 5], name="x")
    assert got.dtype == source.dtype and got.shape == (2, 5)
    assert got.tobytes() == source.tobytes()
    assert got.flags.writeable and got.flags.c_contiguous


def test_binary_errors() -> None:
    with pytest.raises(
        InvalidInput, match=r"needs 32 bytes of binary data, binary_data_size is 28"
    ):
        array_from_binary(b"\0" * 28, "FP32", [2, 4], name="x")
    with pytest.raises(InvalidInput, match="BOOL binary data must be bytes 0 or 1"):
        array_from_binary(b"\x00\x02", "BOOL", [2], name="b")
    nan = np.array([1.0, np.nan], dtype=np.float32).tobytes()
    with pytest.raises(InvalidInput, match="'x' contains NaN or infinity"):
        array_from_binary(nan, "FP32", [2], name="x")
    assert np.isnan(array_from_binary(nan, "FP32", [2], name="x", reject_nonfinite=False)[1])
    inf16 = np.array([np.inf], dtype=ml_dtypes.bfloat16).tobytes()
    with pytest.raises(InvalidInput, match="contains NaN or infinity"):
        array_from_binary(inf16, "BF16", [1], name="x")


def test_bytes_serialization_matches_tritonclient() -> None:
    source = np.array([[b"abc", b""], ["é".encode(), b"\x00\xff"]], dtype=np.object_)
    ours = serialize_bytes(source)
    assert ours == serialize_byte_tensor(source).item()
    assert deserialize_bytes_tensor(ours).tolist() == source.reshape(-1).tolist()
    back = array_from_binary(ours, "BYTES", [2, 2], name="s")
    assert back.tolist() == source.tolist()
    with pytest.raises(InvalidInput, match="ends after 1 of 2"):
        deserialize_bytes(ours[:7], 2, name="s")
    with pytest.raises(InvalidInput, match="element 0 runs past"):
        deserialize_bytes(b"\x09\x00\x00\x00ab", 1, name="s")
    with pytest.raises(InvalidInput, match="3 bytes left over"):
        deserialize_bytes(b"\x00\x00\x00\x00abc", 1, name="s")


def test_all_finite() -> None:
    big = np.full(8, 3.0e38, dtype=np.float32)
    assert all_finite(big)
    big[3] = np.inf
    assert not all_finite(big)
    assert all_finite(np.array([1, 2], dtype=np.int64))
    assert not all_finite(np.array([np.nan], dtype=np.float16))


def test_json_data_forms() -> None:
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert json_data(fortran, "FP32").tolist() == [0, 1, 2, 3, 4, 5]
    bf16 = np.array([[1.5, 2.0]], dtype=ml_dtypes.bfloat16)
    assert json_data(bf16, "BF16").tolist() == [1.5, 2.0]
    big_endian = np.array([1, 2], dtype=">i4")
    assert json_data(big_endian, "INT32").dtype.isnative
    assert json_data(np.array([b"a", "b"], dtype=object), "BYTES") == ["a", "b"]
