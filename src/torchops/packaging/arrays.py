"""Named arrays as safetensors bytes: example inputs, reference samples. No pickle."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from torchops.errors import InvalidInput
from torchops.types import Array

__all__ = ["decode_arrays", "encode_arrays"]

_KINDS = frozenset("biuf")


def encode_arrays(arrays: Mapping[str, Array]) -> bytes:
    """Encode named numeric arrays as safetensors bytes.

    >>> decode_arrays(encode_arrays({"x": np.ones((2, 3), dtype="float32")}))["x"].shape
    (2, 3)
    """
    clean: dict[str, Array] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"array names must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype.kind not in _KINDS:
            raise InvalidInput(f"array {name!r}: {array.dtype} cannot be stored, only numbers")
        clean[name] = np.ascontiguousarray(array)
    return bytes(safetensors.numpy.save(clean))


def decode_arrays(data: bytes) -> dict[str, Array]:
    """Decode safetensors bytes into writable arrays; anything else → ``InvalidInput``."""
    try:
        loaded = safetensors.numpy.load(bytes(data))
    except Exception as exc:  # safetensors raises its own error type
        raise InvalidInput(f"not a safetensors array file: {exc}") from None
    return {
        name: array if array.flags.writeable else array.copy() for name, array in loaded.items()
    }
