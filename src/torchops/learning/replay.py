"""The replay buffer: what an incremental update trains on.

Three pools limit forgetting while the model follows new feedback:

* **recent** — the last ``recent`` accepted feedback rows (a ring);
* **reservoir** — a uniform sample of all older feedback: rows leaving the ring enter
  it by reservoir sampling (Vitter's Algorithm R), so its content does not depend on
  how long the stream has run;
* **anchors** — the registration's reference sample, pseudo-labelled with the
  champion's outputs (soft targets), kept for good.

``sample(n)`` draws ``anchor_fraction`` of a batch from the anchors and splits the rest
between recent and reservoir rows by ``recent_fraction``; an empty pool's share goes to
the others. Feedback rows whose inputs or targets are NaN/inf, or whose class is out of
range, are refused and counted in ``rejected``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from torchops.errors import InvalidInput
from torchops.types import Array, Task

__all__ = ["ReplayBuffer"]


class _Pool:
    """Fixed-capacity row storage for named inputs and a target array."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.inputs: dict[str, Array] = {}
        self.targets: Array | None = None

    def _allocate(self, inputs: Mapping[str, Array], target: Array, capacity: int) -> None:
        self.inputs = {
            name: np.empty((capacity, *a.shape[1:]), dtype=a.dtype) for name, a in inputs.items()
        }
        self.targets = np.empty((capacity, *target.shape[1:]), dtype=target.dtype)

    def put(self, slot: int, inputs: Mapping[str, Array], target: Array, row: int) -> None:
        if self.targets is None:
            self._allocate(inputs, target, self.capacity)
        assert self.targets is not None
        for name, array in inputs.items():
            self.inputs[name][slot] = array[row]
        self.targets[slot] = target[row]

    def row(self, slot: int) -> tuple[dict[str, Array], Array]:
        assert self.targets is not None
        return {k: v[slot : slot + 1] for k, v in self.inputs.items()}, self.targets[
            slot : slot + 1
        ]

    def extend(self, inputs: Mapping[str, Array], target: Array) -> None:
        """Append rows, growing without bound (the anchors)."""
        if self.targets is None:
            self.inputs = {k: np.array(v) for k, v in inputs.items()}
            self.targets = np.array(target)
        else:
            self.inputs = {k: np.concatenate([self.inputs[k], v]) for k, v in inputs.items()}
            self.targets = np.concatenate([self.targets, target])
        self.size = len(self.targets)
        self.capacity = self.size

    def take(self, index: Array) -> tuple[dict[str, Array], Array]:
        assert self.targets is not None
        return {k: v[index] for k, v in self.inputs.items()}, self.targets[index]


class ReplayBuffer:
    """Recent feedback, a reservoir of older feedback and anchors, sampled as one batch.

    ``n_classes`` bounds classification targets (``[0, n_classes)``); when not given it is
    taken from the width of the first anchors' soft targets, and until then only
    non-negative whole classes are checked. ``max_abs``, when set, also refuses input
    rows with any value beyond it.
    """

    def __init__(
        self,
        *,
        recent: int = 512,
        reservoir: int = 2048,
        recent_fraction: float = 0.5,
        anchor_fraction: float = 0.25,
        task: Task = "classification",
        n_classes: int | None = None,
        max_abs: float | None = None,
        seed: int = 0,
    ) -> None:
        if recent < 0 or reservoir < 0 or recent + reservoir == 0:
            raise InvalidInput(
                f"recent and reservoir must be non-negative and not both 0, "
                f"got {recent} and {reservoir}"
            )
        for name, value in (
            ("recent_fraction", recent_fraction),
            ("anchor_fraction", anchor_fraction),
        ):
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must be in [0, 1], got {value}")
        if task not in ("classification", "regression"):
            raise InvalidInput(
                f"a replay buffer holds classification or regression data, not {task!r}"
            )
        if n_classes is not None and n_classes < 2:
            raise InvalidInput(f"n_classes must be at least 2, got {n_classes}")
        if max_abs is not None and not max_abs > 0:
            raise InvalidInput(f"max_abs must be positive, got {max_abs}")
        self.recent = recent
        self.reservoir = reservoir
        self.recent_fraction = recent_fraction
        self.anchor_fraction = anchor_fraction
        self.task: Task = task
        self.n_classes = n_classes
        self.max_abs = max_abs
        self.seed = seed
        self.rejected = 0
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._recent = _Pool(recent)
        self._reservoir = _Pool(reservoir)
        self._anchors = _Pool(0)
        self._head = 0  # next slot of the ring
        self._older = 0  # rows that have left the ring (the reservoir's stream length)
        self._schema: dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]] | None = None
        self._target_shape: tuple[int, ...] | None = None

    # -- adding ------------------------------------------------------------------------

    def add(self, x: Mapping[str, Array], y: Array) -> int:
        """Add labelled feedback rows; returns how many were accepted (the rest are counted)."""
        inputs, target, n = self._checked(x, y, "feedback")
        if self.task == "classification":
            target = self._classes(target)
        ok = self._finite_rows(inputs, n)
        if self.task == "classification":
            whole = np.isfinite(target) & (target == np.floor(target)) & (target >= 0)
            if self.n_classes is not None:
                whole &= target < self.n_classes
            ok &= whole
            target = np.where(ok, target, 0).astype(np.int64)
        else:
            ok &= np.isfinite(target.reshape(n, -1)).all(axis=1)
            target = target.astype(np.float32)
        self._commit_schema(inputs, target)
        self.rejected += int(n - np.count_nonzero(ok))
        for row in np.flatnonzero(ok):
            self._push(inputs, target, int(row))
        accepted = int(np.count_nonzero(ok))
        self.seen += accepted
        return accepted

    def add_anchor(self, x: Mapping[str, Array], soft_targets: Array) -> None:
        """Keep reference rows for good, with the champion's outputs as targets.

        Classifiers take class probabilities (rows sum to 1); regressors the champion's
        predicted values. Any non-finite value refuses the whole call.
        """
        inputs, target, n = self._checked(x, soft_targets, "anchor")
        if not self._finite_rows(inputs, n).all():
            raise InvalidInput("anchor inputs contain NaN, infinite or out-of-range values")
        target = target.astype(np.float32)
        if not np.all(np.isfinite(target)):
            raise InvalidInput("anchor targets contain NaN or infinite values")
        if self.task == "classification":
            if target.ndim != 2:
                raise InvalidInput(
                    f"anchor targets: expected class probabilities of shape [n, n_classes], "
                    f"got {list(target.shape)}"
                )
            width = target.shape[1]
            if self.n_classes is None:
                if width < 2 or width <= self._max_label():
                    raise InvalidInput(f"anchor targets have {width} classes, too few")
            elif width != self.n_classes:
                raise InvalidInput(
                    f"anchor targets: expected {self.n_classes} class probabilities, got {width}"
                )
            if np.any(target < 0) or not np.allclose(target.sum(axis=1), 1.0, atol=1e-3):
                raise InvalidInput(
                    "anchor targets must be class probabilities (non-negative, rows summing "
                    "to 1): pass the softmax of the champion's outputs"
                )
            self.n_classes = width
        self._commit_schema(inputs, target)
        self._anchors.extend(inputs, target)

    # -- sampling ----------------------------------------------------------------------

    def sample(
        self, n: int, *, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, Array], Array, Array]:
        """Draw ``n`` rows (with replacement) mixing anchors, recent and reservoir rows.

        Returns ``(inputs, targets, is_soft)``. Classification targets are float32 class
        probabilities ``[n, n_classes]`` (one-hot for feedback, soft for anchors);
        regression targets are the stored values. ``is_soft`` marks anchor rows.
        """
        if n < 1:
            raise InvalidInput(f"sample size must be at least 1, got {n}")
        if len(self) == 0:
            raise InvalidInput("the replay buffer is empty: add feedback or anchors first")
        rng = rng if rng is not None else self._rng
        sizes = (self._anchors.size, self._recent.size, self._reservoir.size)
        n_anchor = round(n * self.anchor_fraction) if sizes[0] else 0
        if not (sizes[1] or sizes[2]):
            n_anchor = n
        rest = n - n_anchor
        if sizes[1] and sizes[2]:
            n_recent = round(rest * self.recent_fraction)
        else:
            n_recent = rest if sizes[1] else 0
        n_reservoir = rest - n_recent
        parts = []
        for pool, count, soft in (
            (self._anchors, n_anchor, True),
            (self._recent, n_recent, False),
            (self._reservoir, n_reservoir, False),
        ):
            if count:
                inputs, target = pool.take(rng.integers(0, pool.size, size=count))
                parts.append((inputs, self._as_target(target, soft), soft, count))
        names = list(parts[0][0])
        x = {name: np.concatenate([p[0][name] for p in parts]) for name in names}
        y = np.concatenate([p[1] for p in parts])
        soft_mask = np.concatenate([np.full(p[3], p[2]) for p in parts])
        return x, y, soft_mask

    def __len__(self) -> int:
        return self._anchors.size + self._recent.size + self._reservoir.size

    @property
    def n_recent(self) -> int:
        return self._recent.size

    @property
    def n_reservoir(self) -> int:
        return self._reservoir.size

    @property
    def n_anchors(self) -> int:
        return self._anchors.size

    def reservoir_targets(self) -> Array:
        """The targets held in the reservoir (for inspection and tests)."""
        if self._reservoir.targets is None:
            return np.empty((0,))
        return self._reservoir.targets[: self._reservoir.size].copy()

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(recent={self.recent}, reservoir={self.reservoir}, "
            f"recent_fraction={self.recent_fraction}, anchor_fraction={self.anchor_fraction}, "
            f"task={self.task!r}, n_classes={self.n_classes}, seed={self.seed})"
        )

    # -- internals ---------------------------------------------------------------------

    def _push(self, inputs: Mapping[str, Array], target: Array, row: int) -> None:
        ring = self._recent
        if ring.capacity == 0:
            self._offer(inputs, target, row)
            return
        if ring.size == ring.capacity:  # the row about to be overwritten leaves the ring
            old_inputs, old_target = ring.row(self._head)
            self._offer(old_inputs, old_target, 0)
        else:
            ring.size += 1
        ring.put(self._head, inputs, target, row)
        self._head = (self._head + 1) % ring.capacity

    def _offer(self, inputs: Mapping[str, Array], target: Array, row: int) -> None:
        """Algorithm R: the k-th older row replaces a random slot with probability cap/k."""
        pool = self._reservoir
        self._older += 1
        if pool.capacity == 0:
            return
        if pool.size < pool.capacity:
            pool.put(pool.size, inputs, target, row)
            pool.size += 1
            return
        slot = int(self._rng.integers(0, self._older))
        if slot < pool.capacity:
            pool.put(slot, inputs, target, row)

    def _as_target(self, target: Array, soft: bool) -> Array:
        if self.task == "regression" or soft:
            return target.astype(np.float32, copy=False)
        if self.n_classes is None:
            raise InvalidInput(
                "the number of classes is unknown: pass n_classes= or add anchors first"
            )
        one_hot = np.zeros((len(target), self.n_classes), dtype=np.float32)
        one_hot[np.arange(len(target)), target.astype(np.int64)] = 1.0
        return one_hot

    def _commit_schema(self, inputs: Mapping[str, Array], target: Array) -> None:
        """Fix the row layout on the first accepted call."""
        if self._schema is None:
            self._schema = {k: (v.shape[1:], v.dtype) for k, v in inputs.items()}
        if self.task == "regression" and self._target_shape is None:
            self._target_shape = target.shape[1:]

    def _max_label(self) -> int:
        labels = [
            int(p.targets[: p.size].max())
            for p in (self._recent, self._reservoir)
            if p.targets is not None and p.size
        ]
        return max(labels, default=-1)

    def _finite_rows(self, inputs: Mapping[str, Array], n: int) -> Array:
        ok = np.ones(n, dtype=bool)
        for array in inputs.values():
            if array.dtype.kind in "fc":
                flat = array.reshape(n, -1)
                ok &= np.isfinite(flat).all(axis=1)
                if self.max_abs is not None:
                    ok &= (np.abs(flat) <= self.max_abs).all(axis=1)
            elif self.max_abs is not None and array.dtype.kind in "iu":
                ok &= (np.abs(array.reshape(n, -1)) <= self.max_abs).all(axis=1)
        return ok

    def _classes(self, target: Array) -> Array:
        if target.ndim != 1:
            raise InvalidInput(
                "feedback targets: expected one class index per row, "
                f"got shape {list(target.shape)}"
            )
        if target.dtype.kind not in "iuf":
            raise InvalidInput(f"feedback targets must be numbers, got {target.dtype}")
        return target.astype(np.float64)

    def _checked(
        self, x: Mapping[str, Array], y: Array, what: str
    ) -> tuple[dict[str, Array], Array, int]:
        """Check names, shapes and dtypes against the first rows seen; nothing is stored."""
        if not isinstance(x, Mapping) or not x:
            raise InvalidInput(f"{what} inputs must be a non-empty mapping of name to array")
        target = np.asarray(y)
        if target.ndim == 0:
            raise InvalidInput(f"{what} targets must have one row per input row")
        n = target.shape[0]
        inputs: dict[str, Array] = {}
        for name, value in x.items():
            array = np.asarray(value)
            if array.ndim == 0 or array.shape[0] != n:
                raise InvalidInput(
                    f"{what} input {name!r}: expected {n} rows like the targets, "
                    f"got shape {list(array.shape)}"
                )
            if array.dtype.kind not in "biuf":
                raise InvalidInput(f"{what} input {name!r}: unsupported dtype {array.dtype}")
            inputs[name] = array
        if self._schema is not None:
            if set(inputs) != set(self._schema):
                raise InvalidInput(
                    f"{what} inputs {sorted(inputs)} do not match the buffer's "
                    f"{sorted(self._schema)}"
                )
            for name, (shape, dtype) in self._schema.items():
                array = inputs[name]
                if array.shape[1:] != shape:
                    raise InvalidInput(
                        f"{what} input {name!r}: expected rows of shape {list(shape)}, "
                        f"got {list(array.shape[1:])}"
                    )
                if array.dtype != dtype:
                    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                        raise InvalidInput(
                            f"{what} input {name!r}: expected {dtype}, got {array.dtype}"
                        )
                    inputs[name] = array.astype(dtype)
        if self.task == "regression":
            if target.dtype.kind not in "iuf":
                raise InvalidInput(f"{what} targets must be numbers, got {target.dtype}")
            if self._target_shape is not None and target.shape[1:] != self._target_shape:
                raise InvalidInput(
                    f"{what} targets: expected rows of shape {list(self._target_shape)}, "
                    f"got {list(target.shape[1:])}"
                )
        return inputs, target, n
