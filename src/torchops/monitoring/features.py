"""Model inputs as a flat table of numeric features, the unit profiles and drift work on.

The reduction, per input of the signature (``shape[0]`` is the batch):

- an input with at most ``MAX_ELEMENTWISE`` (256) values per row gives one feature per
  element, named ``"<input>[i]"`` with ``i`` the flat (C-order) index in the row, or
  ``"<input>"`` when a row is a scalar (shape ``[-1]``). Digits' ``[-1, 64]`` pixels are 64
  features ``x[0]`` … ``x[63]``;
- a bigger input (images, long vectors) gives summary statistics per row instead:
  rank ≥ 3 (``[N, C, ...]``, channel = dim 1) → the mean and standard deviation of every
  channel, ``"<input>.mean[c]"`` and ``"<input>.std[c]"``; rank 2 (``[N, D]``), or a rank
  ≥ 3 input whose channel count is variable → the mean and standard deviation of the
  whole row, ``"<input>.mean"`` and ``"<input>.std"``. An input with another variable
  (``-1``) dimension besides the batch counts as big.

Booleans and integers become float64; non-finite values are kept as they are (the codec
rejects them by default; binning skips NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array, Signature, TensorSpec

__all__ = ["MAX_ELEMENTWISE", "extract", "feature_names", "reduction"]

#: inputs with at most this many values per row are monitored element by element
MAX_ELEMENTWISE = 256


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one input becomes features: ``elements``, ``channels`` or ``row`` statistics."""

    spec: TensorSpec
    kind: str
    names: tuple[str, ...]


def _plan(spec: TensorSpec) -> _Plan:
    row = spec.shape[1:]
    known = all(d >= 0 for d in row)
    size = math.prod(row) if known else -1
    if not row:
        return _Plan(spec, "elements", (spec.name,))
    if known and size <= MAX_ELEMENTWISE:
        return _Plan(spec, "elements", tuple(f"{spec.name}[{i}]" for i in range(size)))
    if len(row) >= 2 and row[0] >= 0:
        names = [f"{spec.name}.mean[{c}]" for c in range(row[0])]
        names += [f"{spec.name}.std[{c}]" for c in range(row[0])]
        return _Plan(spec, "channels", tuple(names))
    return _Plan(spec, "row", (f"{spec.name}.mean", f"{spec.name}.std"))


def _plans(signature: Signature) -> list[_Plan]:
    if not signature.inputs:
        raise InvalidInput("the signature has no inputs to monitor")
    return [_plan(spec) for spec in signature.inputs]


def feature_names(signature: Signature) -> list[str]:
    """The feature names ``extract`` produces for ``signature``, in column order."""
    return [name for plan in _plans(signature) for name in plan.names]


def reduction(signature: Signature) -> str:
    """How each input is reduced, e.g. ``"x: elements"`` or ``"image: channels"``."""
    return "; ".join(f"{plan.spec.name}: {plan.kind}" for plan in _plans(signature))


def _checked(spec: TensorSpec, value: object) -> Array:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input {spec.name!r}: not an array ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"input {spec.name!r}: expected numbers, got dtype {array.dtype}")
    expected = "[" + ", ".join(str(d) for d in spec.shape) + "]"
    ok = array.ndim == len(spec.shape) and all(
        d == -1 or d == got for d, got in zip(spec.shape[1:], array.shape[1:], strict=True)
    )
    if not ok:
        got = "[" + ", ".join(str(d) for d in array.shape) + "]"
        raise InvalidInput(f"input {spec.name!r}: expected shape {expected}, got {got}")
    return array.astype(np.float64, copy=False)


def _columns(plan: _Plan, array: Array) -> Array:
    n = array.shape[0]
    if n == 0:
        return np.empty((0, len(plan.names)))
    if plan.kind == "elements":
        return array.reshape(n, len(plan.names))
    if plan.kind == "channels":
        channels: Array = array.reshape(n, array.shape[1], -1)
        if channels.shape[2] == 0:
            raise InvalidInput(f"input {plan.spec.name!r}: a row has no values")
        return np.concatenate([channels.mean(axis=2), channels.std(axis=2)], axis=1)
    flat: Array = array.reshape(n, -1)
    if flat.shape[1] == 0:
        raise InvalidInput(f"input {plan.spec.name!r}: a row has no values")
    return np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1)


def extract(signature: Signature, inputs: Mapping[str, Array]) -> Array:
    """``[n_rows, n_features]`` float64 features of a batch of inputs (see the module doc).

    Raises ``InvalidInput`` for a missing or unknown input, a shape that does not match the
    signature, non-numeric data, or inputs with different numbers of rows.
    """
    plans = _plans(signature)
    if not isinstance(inputs, Mapping):
        raise InvalidInput("inputs must be a mapping of input name to array")
    known = set(signature.input_names)
    unknown = sorted(str(k) for k in inputs if k not in known)
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0]!r}: expected {', '.join(sorted(known))}")
    blocks: list[Array] = []
    rows: int | None = None
    for plan in plans:
        if plan.spec.name not in inputs:
            raise InvalidInput(f"missing input {plan.spec.name!r}")
        array = _checked(plan.spec, inputs[plan.spec.name])
        if rows is not None and array.shape[0] != rows:
            raise InvalidInput(
                f"input {plan.spec.name!r} has {array.shape[0]} rows, the others have {rows}"
            )
        rows = array.shape[0]
        blocks.append(_columns(plan, array))
    matrix = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
    return np.ascontiguousarray(matrix, dtype=np.float64)
