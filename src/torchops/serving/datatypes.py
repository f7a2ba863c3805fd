"""Open Inference Protocol datatypes and their numpy and torch forms.

The protocol names element types ``BOOL``, ``INT8``…``INT64``, ``UINT8``…``UINT64``,
``FP16``, ``FP32``, ``FP64``, ``BF16`` and ``BYTES``. Here they map to numpy dtypes
(``BF16`` to ``ml_dtypes.bfloat16``, as ``tritonclient`` does) and to torch dtypes, and
tensors convert from JSON ``data`` and from binary tensor data, and back.

Binary tensor data is little-endian and row-major; ``BOOL`` is one byte per element
(0 or 1); ``BYTES`` elements are each a 4-byte little-endian length followed by that many
bytes.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATATYPES",
    "all_finite",
    "array_from_binary",
    "array_from_json",
    "binary_data",
    "datatype_of",
    "deserialize_bytes",
    "from_torch",
    "json_data",
    "numpy_dtype",
    "serialize_bytes",
    "to_torch",
    "torch_dtype",
]

_BF16 = np.dtype(ml_dtypes.bfloat16)

#: OIP datatype -> numpy dtype (``BYTES`` elements are Python ``bytes`` in an object array)
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": _BF16,
    "BYTES": np.dtype(np.object_),
}
_BY_DTYPE: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPES.items()}
_LITTLE = sys.byteorder == "little"
# how binary tensor data lays each datatype out
_LITTLE_ENDIAN = {name: dtype.newbyteorder("<") for name, dtype in DATATYPES.items()}
_FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})
_INTS = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
# largest finite value of each narrow float type (see _cast_floats)
_MAX = {
    "FP16": float(np.finfo(np.float16).max),
    "FP32": float(np.finfo(np.float32).max),
    "BF16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),  # type: ignore[no-untyped-call]
}
_F64 = np.dtype(np.float64)
_F32_MAX = _MAX["FP32"]
# dtypes orjson serializes natively from a numpy array
_ORJSON_NATIVE = frozenset("?bhilqBHILQefd")


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype name; ``InvalidInput`` for an unknown name."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    return dtype


def datatype_of(dtype: Any) -> str:
    """The OIP datatype of a numpy dtype (or dtype name such as ``"float32"``)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise InvalidInput(f"{dtype!r} is not a numpy dtype") from None
    name = _BY_DTYPE.get(resolved.newbyteorder("=") if resolved.byteorder == ">" else resolved)
    if name is not None:
        return name
    if resolved.kind in "SU":
        return "BYTES"
    raise InvalidInput(f"dtype {resolved} has no Open Inference Protocol datatype")


def torch_dtype(datatype: str) -> torch.dtype:
    """The torch dtype of an OIP datatype (``BYTES`` has none)."""
    import torch

    if datatype == "BF16":
        return torch.bfloat16
    if datatype == "BYTES":
        raise InvalidInput("datatype BYTES has no torch dtype")
    result: torch.dtype = getattr(torch, numpy_dtype(datatype).name)
    return result


def to_torch(array: Array) -> torch.Tensor:
    """A torch tensor sharing ``array``'s memory where possible (``bfloat16`` included)."""
    import torch

    if array.dtype == _BF16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def from_torch(tensor: torch.Tensor) -> Array:
    """A numpy array of a CPU tensor; ``bfloat16`` becomes ``ml_dtypes.bfloat16``."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        result: Array = tensor.contiguous().view(torch.uint16).numpy().view(_BF16)
        return result
    converted: Array = tensor.numpy()
    return converted


def all_finite(array: Array) -> bool:
    """True when no element of a floating-point array is NaN or infinite."""
    if array.dtype.kind != "f" and array.dtype != _BF16:
        return True
    return bool(np.isfinite(array).all())


def _shape_size(shape: Sequence[int]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _cast_floats(values: Array, datatype: str, name: str, reject_nonfinite: bool) -> Array:
    """Cast JSON numbers (float64 or integers) to a float datatype without overflow warnings."""
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    if datatype == "FP64":
        if reject_nonfinite and not all_finite(values):
            raise InvalidInput(f"input {name!r} contains NaN or infinity")
        return values
    # a narrowing cast of a value beyond the target's range gives inf (and a numpy
    # warning): cast directly only when every value is known to fit (NaN fails the test)
    if not values.size or np.abs(values).max() <= _MAX[datatype]:
        return values.astype(DATATYPES[datatype])
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values.astype(DATATYPES[datatype])
    if reject_nonfinite and not bool(np.isfinite(cast).all()):
        raise InvalidInput(
            f"input {name!r} contains NaN, infinity or a value out of range for {datatype}"
        )
    return cast


def _cast_ints(values: Array, datatype: str, name: str) -> Array:
    dtype = DATATYPES[datatype]
    if values.dtype == dtype:
        return values
    if values.size:
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise InvalidInput(
                f"input {name!r}: value {low if low < info.min else high} is out of range "
                f"for {datatype}"
            )
    return values.astype(dtype)


def array_from_json(
    data: Any, datatype: str, shape: Sequence[int], *, name: str, reject_nonfinite: bool = True
) -> Array:
    """The array of an input's JSON ``data`` (flat, or nested exactly as ``shape``)."""
    if type(data) is not list:
        raise InvalidInput(f"input {name!r}: 'data' must be a JSON array")
    if datatype == "BYTES":
        return _bytes_from_json(data, shape, name)
    if datatype not in DATATYPES:
        numpy_dtype(datatype)
    try:
        values = np.array(data)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"input {name!r}: 'data' is not a regular array of numbers (ragged nesting?)"
        ) from None
    # the common case, kept short: flat JSON floats, all within range, for an FP32 input
    if (
        datatype == "FP32"
        and values.dtype is _F64
        and values.ndim == 1
        and values.size == _shape_size(shape)
        and values.size
        and np.abs(values).max() <= _F32_MAX
    ):
        return values.astype(np.float32).reshape(shape)
    kind = values.dtype.kind
    size = _shape_size(shape)
    if values.ndim > 1 and tuple(values.shape) != tuple(shape):
        raise InvalidInput(
            f"input {name!r}: data is nested as {_fmt(values.shape)} but shape is {_fmt(shape)}"
        )
    if values.size != size:
        raise InvalidInput(
            f"input {name!r}: shape {_fmt(shape)} needs {size} values, data has {values.size}"
        )
    if datatype in _FLOATS:
        if kind not in "fiu":
            raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
        result = _cast_floats(values, datatype, name, reject_nonfinite)
    elif datatype in _INTS:
        if kind not in "iu":
            raise InvalidInput(
                f"input {name!r}: {datatype} data must be integers"
                + (" in range" if kind == "O" else "")
            )
        result = _cast_ints(values, datatype, name)
    else:  # BOOL
        if kind != "b" and values.size:
            raise InvalidInput(f"input {name!r}: BOOL data must be true or false")
        result = values.astype(np.bool_, copy=False)
    return result.reshape(shape)


def _bytes_from_json(data: list[Any], shape: Sequence[int], name: str) -> Array:
    flat: list[bytes] = []
    _flatten_strings(data, flat, name)
    size = _shape_size(shape)
    if len(flat) != size:
        raise InvalidInput(
            f"input {name!r}: shape {_fmt(shape)} needs {size} values, data has {len(flat)}"
        )
    result = np.empty(size, dtype=np.object_)
    result[:] = flat
    return result.reshape(shape)


def _flatten_strings(items: list[Any], out: list[bytes], name: str) -> None:
    for element in items:
        if type(element) is list:
            _flatten_strings(element, out, name)
        elif type(element) is str:
            out.append(element.encode())
        else:
            raise InvalidInput(f"input {name!r}: BYTES data must be strings")


def array_from_binary(
    buffer: bytes | memoryview,
    datatype: str,
    shape: Sequence[int],
    *,
    name: str,
    reject_nonfinite: bool = True,
) -> Array:
    """The array of an input's binary tensor data (a fresh, writable, aligned copy)."""
    size = _shape_size(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buffer, size, name=name).reshape(shape)
    dtype = numpy_dtype(datatype)
    expected = size * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInput(
            f"input {name!r}: shape {_fmt(shape)} {datatype} needs {expected} bytes of binary "
            f"data, binary_data_size is {len(buffer)}"
        )
    # one copy into memory numpy owns: writable, as torch wants its inputs
    array = np.frombuffer(bytearray(buffer), dtype=_LITTLE_ENDIAN[datatype])
    if not _LITTLE or not array.flags.aligned:
        array = array.astype(dtype)
    if datatype == "BOOL":
        if size and int(array.view(np.uint8).max()) > 1:
            raise InvalidInput(f"input {name!r}: BOOL binary data must be bytes 0 or 1")
    elif reject_nonfinite and datatype in _FLOATS and not all_finite(array):
        raise InvalidInput(f"input {name!r} contains NaN or infinity")
    result: Array = array.reshape(shape)
    return result


def serialize_bytes(array: Array) -> bytes:
    """``BYTES`` binary form: each element as a 4-byte little-endian length and its bytes."""
    parts: list[bytes] = []
    for element in array.reshape(-1).tolist():
        raw = element.encode() if isinstance(element, str) else bytes(element)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int, *, name: str = "tensor") -> Array:
    """``count`` length-prefixed elements from ``buffer`` as an object array of bytes."""
    view = memoryview(buffer)
    result = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(f"input {name!r}: BYTES binary data ends after {i} of {count}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"input {name!r}: BYTES element {i} runs past the binary data")
        result[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise InvalidInput(
            f"input {name!r}: {len(view) - offset} bytes left over after {count} BYTES elements"
        )
    return result


def binary_data(array: Array, datatype: str) -> bytes:
    """The binary tensor data of an output array of ``datatype``."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    if not _LITTLE or array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def json_data(array: Array, datatype: str) -> Any:
    """What to put in an output's JSON ``data``: a flat array orjson serializes, or a list."""
    if datatype == "BYTES":
        return [
            e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e)
            for e in array.reshape(-1).tolist()
        ]
    if array.dtype.char in _ORJSON_NATIVE and array.dtype.isnative:
        return array.reshape(-1) if array.flags.c_contiguous else np.ravel(array)
    if datatype == "BF16":
        return array.astype(np.float32).reshape(-1)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")).reshape(-1)
