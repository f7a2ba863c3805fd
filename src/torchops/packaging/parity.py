"""Compare a format's outputs with the eager model's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from torchops.types import Array

__all__ = ["DEFAULT_ATOL", "DEFAULT_RTOL", "Parity", "compare"]

#: a format passes when every |actual - expected| <= atol + rtol * |expected|
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


@dataclass(frozen=True, slots=True)
class Parity:
    """``max_rel`` is |actual - expected| / max(|expected|, atol): finite near zero."""

    ok: bool
    max_abs: float
    max_rel: float
    problem: str | None = None


def compare(
    names: Sequence[str],
    expected: Sequence[Array],
    actual: Sequence[Array],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> Parity:
    """Elementwise comparison of each output; NaN matches NaN and inf matches the same inf.

    >>> compare(["y"], [np.array([1.0, 2.0])], [np.array([1.0, 2.001])]).ok
    True
    """
    max_abs = max_rel = 0.0
    floor = atol if atol > 0 else 1e-12
    problems: list[str] = []
    if len(expected) != len(actual):
        return Parity(False, 0.0, 0.0, f"{len(actual)} outputs, eager gives {len(expected)}")
    for name, want, got in zip(names, expected, actual, strict=True):
        if want.shape != got.shape:
            problems.append(f"output {name!r} is {list(got.shape)}, eager {list(want.shape)}")
            continue
        if want.dtype != got.dtype:
            problems.append(f"output {name!r} is {got.dtype}, eager {want.dtype}")
            continue
        a = got.astype(np.float64, copy=False)
        b = want.astype(np.float64, copy=False)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a - b)
            same = (a == b) | (np.isnan(a) & np.isnan(b))
        diff[same] = 0.0
        odd = ~np.isfinite(diff)
        if odd.any():
            problems.append(f"output {name!r} has {int(odd.sum())} NaN/inf values eager lacks")
            diff[odd] = 0.0
        if diff.size == 0:
            continue
        scale = np.abs(np.where(np.isfinite(b), b, 0.0))
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / np.maximum(scale, floor)).max()))
        bad = int((diff > atol + rtol * scale).sum())
        if bad:
            problems.append(
                f"output {name!r} differs from eager in {bad} of {diff.size} values "
                f"(max abs diff {float(diff.max()):.3g}, atol {atol:g}, rtol {rtol:g})"
            )
    return Parity(not problems, max_abs, max_rel, "; ".join(problems) or None)
