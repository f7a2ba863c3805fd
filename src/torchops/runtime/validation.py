"""Input validation shared by every runtime (and by packaging for reference samples).

The casting rule, applied per input against its ``TensorSpec``:

- the same dtype passes untouched (no copy when the array is already C-contiguous);
- a float input accepts any float or integer array (JSON clients send ``float64`` or
  ``int64``); it is cast to the expected width;
- an integer input accepts any integer array whose values fit the expected type
  (``int64`` token ids into an ``int32`` input); floats are refused, never truncated;
- a bool input accepts bool only;
- strings, objects, complex numbers and dates are always refused.

Shapes must have the expected rank and match every dimension that is not ``-1``; all
inputs whose first dimension is ``-1`` (the batch) share one batch size of at least 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array, Signature, TensorSpec

__all__ = ["batch_size", "describe", "validate_input", "validate_inputs"]

_FLOAT_SOURCES = frozenset("fiu")
_INT_SOURCES = frozenset("iu")


def describe(spec: TensorSpec) -> str:
    """``[-1, 64] float32``: how error messages name an expected tensor."""
    return f"{list(spec.shape)} {spec.dtype}"


def _dtype_name(dtype: np.dtype[Any]) -> str:
    if dtype.kind in "US":
        return "str"
    if dtype.kind == "O":
        return "object"
    return dtype.name


def _refuse(
    spec: TensorSpec, shape: Sequence[int], dtype: np.dtype[Any], why: str = ""
) -> InvalidInput:
    got = f"{list(shape)} {_dtype_name(dtype)}"
    message = f"input {spec.name!r}: expected shape {describe(spec)}, got {got}"
    return InvalidInput(f"{message} ({why})" if why else message)


def _castable(spec: TensorSpec, array: Array) -> str:
    """Return '' if ``array`` converts safely to the spec's dtype, else the reason why not."""
    target = spec.np_dtype
    source = array.dtype
    if target.kind == "f":
        if source.kind in _FLOAT_SOURCES:
            return ""
        return f"{source} does not convert to {target}"
    if target.kind in _INT_SOURCES:
        if source.kind not in _INT_SOURCES:
            return f"{source} does not convert to {target} without loss"
        if np.can_cast(source, target, casting="safe") or array.size == 0:
            return ""
        info = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            return f"values [{low}, {high}] do not fit {target}"
        return ""
    if target.kind == "b":
        return "" if source.kind == "b" else f"{source} does not convert to bool"
    return f"unsupported expected dtype {target}"


def validate_input(spec: TensorSpec, value: Any) -> Array:
    """Return ``value`` as a C-contiguous array of the spec's dtype, or raise ``InvalidInput``."""
    if isinstance(value, np.ndarray):
        array = value
    else:
        try:
            array = np.asarray(value)
        except Exception as exc:  # whatever numpy refuses is bad input
            raise InvalidInput(
                f"input {spec.name!r}: expected an array of shape {describe(spec)}, "
                f"got {type(value).__name__} ({exc})"
            ) from None
    if array.dtype.kind in "OUSVMmc":
        raise _refuse(
            spec, array.shape, array.dtype, f"{_dtype_name(array.dtype)} is not a numeric tensor"
        )
    shape = array.shape
    if len(shape) != len(spec.shape) or any(
        want != -1 and want != got for want, got in zip(spec.shape, shape, strict=False)
    ):
        raise _refuse(spec, shape, array.dtype)
    if array.dtype != spec.np_dtype:
        why = _castable(spec, array)
        if why:
            raise _refuse(spec, shape, array.dtype, why)
        return np.ascontiguousarray(array, dtype=spec.np_dtype)
    if not array.flags.c_contiguous:
        return np.ascontiguousarray(array)
    return array


def batch_size(signature: Signature, arrays: Sequence[Array]) -> int:
    """The shared batch size of ``arrays`` (in signature order), or raise ``InvalidInput``."""
    size: int | None = None
    first = ""
    for spec, array in zip(signature.inputs, arrays, strict=True):
        if not spec.shape or spec.shape[0] != -1:
            continue
        rows = int(array.shape[0])
        if rows == 0:
            raise InvalidInput(f"input {spec.name!r}: empty batch (0 rows)")
        if size is None:
            size, first = rows, spec.name
        elif rows != size:
            raise InvalidInput(
                f"inputs have different batch sizes: {first!r} has {size} rows, "
                f"{spec.name!r} has {rows}"
            )
    return 1 if size is None else size


def validate_inputs(signature: Signature, inputs: Mapping[str, Any]) -> list[Array]:
    """Check names, shapes and dtypes; return the arrays in signature order.

    >>> from torchops.types import TensorSpec, Signature
    >>> sig = Signature((TensorSpec("x", "float32", (-1, 2)),), ())
    >>> validate_inputs(sig, {"x": [[1, 2]]})[0].dtype
    dtype('float32')
    """
    if not isinstance(inputs, Mapping):
        raise InvalidInput(
            f"inputs must be a mapping of input name to array, got {type(inputs).__name__}"
        )
    specs = signature.inputs
    if len(inputs) != len(specs) or any(spec.name not in inputs for spec in specs):
        expected = ", ".join(f"{s.name!r} {describe(s)}" for s in specs)
        missing = [s.name for s in specs if s.name not in inputs]
        if missing:
            spec = next(s for s in specs if s.name == missing[0])
            raise InvalidInput(
                f"missing input {spec.name!r} (expected shape {describe(spec)}); "
                f"the model takes {expected}"
            )
        extra = sorted(str(k) for k in inputs if k not in signature.input_names)
        raise InvalidInput(f"unexpected input {extra[0]!r}; the model takes {expected}")
    arrays = [validate_input(spec, inputs[spec.name]) for spec in specs]
    batch_size(signature, arrays)
    return arrays
