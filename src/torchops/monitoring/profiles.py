"""Reference profiles: what a version's training inputs and predictions looked like.

A profile is built once, at registration, from the reference sample (see
``torchops.monitoring.features`` for how inputs become features). Per feature it keeps:

- ``edges``: cut points fixed once. The inner ones are the reference quantiles
  ``1/bins … (bins-1)/bins`` (default ``bins=10``, deciles); around them sit two outer cuts,
  just below the reference minimum and at the reference maximum, so the two open end bins
  ``(-inf, e0]`` and ``(e_last, +inf)`` hold exactly the out-of-range values (share 0 in
  the reference). Repeated cuts are merged, so a feature with few distinct values has
  fewer bins, and a constant feature has three: below, at and above its value. Bins are
  right-closed: ``(-inf, e0], (e0, e1], …, (e_last, +inf)``.
- ``proportions``: the reference share of each bin (``len(edges) + 1`` of them);
- ``sample``: up to ``SAMPLE_SIZE`` (500) reference values (the same rows for every
  feature, drawn with a fixed seed) for the small-window KS test;
- ``mean``, ``std``, ``min``, ``max`` of the finite reference values.

The prediction distribution comes from the model's outputs on the reference sample: for
classifiers the share of each predicted class (argmax of the first output, ``n_classes``
entries); otherwise the binned per-row mean of the first output, with its own edges
(``prediction_edges``). ``bin_counts`` and ``prediction_counts`` turn live rows into
counts against these fixed bins; counts of two batches add up to the counts of both, so
live windows merge on a stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from torchops.errors import InvalidInput, NotFound, TorchopsError
from torchops.monitoring.features import extract, feature_names, reduction
from torchops.types import Array, Signature, Task

__all__ = [
    "SAMPLE_SIZE",
    "FeatureProfile",
    "Profile",
    "bin_counts",
    "build_profile",
    "padded_edges",
    "prediction_counts",
    "prediction_values",
    "profile_from_artifacts",
]

#: reference values kept per feature for the KS test
SAMPLE_SIZE = 500
_FORMAT = "torchops.profile/1"
_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class FeatureProfile:
    """One feature of the reference: fixed bin edges, shares per bin, a sample, moments."""

    name: str
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    sample: tuple[float, ...]
    mean: float
    std: float
    min: float
    max: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "edges": list(self.edges),
            "proportions": list(self.proportions),
            "sample": list(self.sample),
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
        }


@dataclass(frozen=True, slots=True)
class Profile:
    """The reference statistics of a model version (see the module doc)."""

    features: tuple[FeatureProfile, ...]
    n_reference: int
    task: Task
    prediction: tuple[float, ...] | None
    prediction_edges: tuple[float, ...] | None
    reduction: str
    bins: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def feature(self, name: str) -> FeatureProfile:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise NotFound(f"the profile has no feature {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "n_reference": self.n_reference,
            "task": self.task,
            "bins": self.bins,
            "reduction": self.reduction,
            "prediction": list(self.prediction) if self.prediction is not None else None,
            "prediction_edges": (
                list(self.prediction_edges) if self.prediction_edges is not None else None
            ),
            "features": [f.to_dict() for f in self.features],
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Profile:
        """Parse ``to_bytes`` output; anything else raises ``InvalidInput``."""
        try:
            raw = orjson.loads(data)
            if raw.get("format") != _FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {_FORMAT!r}")
            features = tuple(
                FeatureProfile(
                    name=str(f["name"]),
                    edges=_floats(f["edges"]),
                    proportions=_floats(f["proportions"]),
                    sample=_floats(f["sample"]),
                    mean=float(f["mean"]),
                    std=float(f["std"]),
                    min=float(f["min"]),
                    max=float(f["max"]),
                )
                for f in raw["features"]
            )
            for f in features:
                if len(f.proportions) != len(f.edges) + 1 or not f.edges:
                    raise ValueError(f"feature {f.name!r} has inconsistent bins")
            prediction = raw["prediction"]
            edges = raw["prediction_edges"]
            task = raw["task"]
            if task not in ("classification", "regression", "other"):
                raise ValueError(f"unknown task {task!r}")
            return cls(
                features=features,
                n_reference=int(raw["n_reference"]),
                task=task,
                prediction=_floats(prediction) if prediction is not None else None,
                prediction_edges=_floats(edges) if edges is not None else None,
                reduction=str(raw["reduction"]),
                bins=int(raw["bins"]),
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"not a torchops profile: {exc}") from None


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _edges(values: Array, bins: int) -> Array:
    """Outer cuts at min⁻ and max around the inner quantiles, repeats merged."""
    low, high = float(values.min()), float(values.max())
    inner = np.quantile(values, np.arange(1, bins) / bins)
    cuts = np.concatenate([[np.nextafter(low, -np.inf)], inner, [high]])
    return np.unique(cuts)


def _shares(edges: Array, values: Array) -> Array:
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def _feature(name: str, column: Array, rows: Array, bins: int) -> FeatureProfile:
    finite = column[np.isfinite(column)]
    if finite.size == 0:
        raise InvalidInput(f"reference feature {name!r} has no finite values")
    edges = _edges(finite, bins)
    sample = column[rows]
    return FeatureProfile(
        name=name,
        edges=tuple(edges.tolist()),
        proportions=tuple(_shares(edges, finite).tolist()),
        sample=tuple(sample[np.isfinite(sample)].tolist()),
        mean=float(finite.mean()),
        std=float(finite.std()),
        min=float(finite.min()),
        max=float(finite.max()),
    )


def _n_classes(signature: Signature, first: Array) -> int:
    if signature.labels:
        return len(signature.labels)
    width = int(np.prod(first.shape[1:])) if first.ndim > 1 else 0
    if width < 2:
        raise InvalidInput("a classifier's first output needs one score per class")
    return width


def _reduce_predictions(task: Task, values: Array) -> Array:
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"predictions must be numbers, got dtype {array.dtype}")
    if array.ndim == 0:
        raise InvalidInput("predictions must have one entry per row")
    if task == "classification":
        if array.ndim == 1:
            if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
                raise InvalidInput("class predictions must be whole class indices")
            return array.astype(np.int64)
        winners: Array = array.reshape(array.shape[0], -1).argmax(axis=1)
        return winners
    if array.ndim == 1:
        return array.astype(np.float64)
    means: Array = array.reshape(array.shape[0], -1).astype(np.float64).mean(axis=1)
    return means


def prediction_values(signature: Signature, outputs: Mapping[str, Array]) -> Array:
    """Per-row predictions from model outputs: class index (argmax of the first output)
    for classifiers, else the mean of each row of the first output."""
    first = signature.outputs[0].name if signature.outputs else None
    if first is None or first not in outputs:
        raise InvalidInput(f"the outputs have no {first!r} (the signature's first output)")
    return _reduce_predictions(signature.task, outputs[first])


def build_profile(
    signature: Signature,
    reference: Mapping[str, Array],
    outputs: Mapping[str, Array] | None = None,
    *,
    bins: int = 10,
) -> Profile:
    """Summarise a reference sample (and the model's outputs on it) as a ``Profile``."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise InvalidInput(f"bins must be an integer ≥ 2, got {bins!r}")
    matrix = extract(signature, reference)
    n = matrix.shape[0]
    if n == 0:
        raise InvalidInput("the reference sample has no rows")
    rows = np.sort(np.random.default_rng(0).permutation(n)[:SAMPLE_SIZE])
    names = feature_names(signature)
    features = tuple(_feature(name, matrix[:, i], rows, bins) for i, name in enumerate(names))
    prediction: tuple[float, ...] | None = None
    prediction_edges: tuple[float, ...] | None = None
    if outputs is not None:
        predicted = prediction_values(signature, outputs)
        if predicted.shape[0] != n:
            raise InvalidInput(f"the outputs have {predicted.shape[0]} rows, the reference {n}")
        if signature.task == "classification":
            k = _n_classes(signature, np.asarray(outputs[signature.outputs[0].name]))
            if predicted.min() < 0 or predicted.max() >= k:
                raise InvalidInput(f"a predicted class is outside 0..{k - 1}")
            prediction = tuple((np.bincount(predicted, minlength=k) / n).tolist())
        else:
            finite = predicted[np.isfinite(predicted)]
            if finite.size:
                edges = _edges(finite, bins)
                prediction_edges = tuple(edges.tolist())
                prediction = tuple(_shares(edges, finite).tolist())
    return Profile(
        features=features,
        n_reference=n,
        task=signature.task,
        prediction=prediction,
        prediction_edges=prediction_edges,
        reduction=reduction(signature),
        bins=bins,
    )


def padded_edges(profile: Profile) -> Array:
    """``[n_features, max_edges]`` edges, padded with +inf (which no value exceeds)."""
    width = max((len(f.edges) for f in profile.features), default=0)
    table = np.full((len(profile.features), width), np.inf)
    for i, feature in enumerate(profile.features):
        table[i, : len(feature.edges)] = feature.edges
    return table


def bin_counts(profile: Profile, matrix: Array, *, edges: Array | None = None) -> Array:
    """``[n_features, n_bins]`` int64 counts of ``matrix`` rows in the profile's bins.

    ``n_bins`` is the largest bin count of any feature; a feature with fewer bins has
    zeros past its last. NaN values are not counted. ``edges`` is ``padded_edges(profile)``
    when the caller keeps it around.
    """
    table = padded_edges(profile) if edges is None else edges
    n_features, width = table.shape
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != n_features:
        raise InvalidInput(
            f"expected a [rows, {n_features}] feature matrix, got shape {list(matrix.shape)}"
        )
    counts = np.zeros(n_features * (width + 1), dtype=np.int64)
    offsets = np.arange(n_features) * (width + 1)
    for start in range(0, matrix.shape[0], _CHUNK):
        block = matrix[start : start + _CHUNK]
        index = (block[:, :, None] > table[None, :, :]).sum(axis=2) + offsets
        counts += np.bincount(index[~np.isnan(block)], minlength=counts.size)
    return counts.reshape(n_features, width + 1)


def prediction_counts(profile: Profile, predictions: Array) -> Array:
    """Counts of per-row predictions in the profile's prediction bins (or classes)."""
    if profile.prediction is None:
        raise InvalidInput("the profile has no prediction distribution")
    values = _reduce_predictions(profile.task, predictions)
    size = len(profile.prediction)
    if profile.task == "classification":
        if values.size and (values.min() < 0 or values.max() >= size):
            raise InvalidInput(f"a predicted class is outside 0..{size - 1}")
        return np.bincount(values, minlength=size).astype(np.int64)
    edges = np.asarray(profile.prediction_edges, dtype=np.float64)
    values = values[~np.isnan(values)]
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=size).astype(np.int64)


def profile_from_artifacts(
    signature: Signature, torchscript: bytes, reference: bytes, *, bins: int = 10
) -> bytes:
    """The profile (``to_bytes``) of a reference sample blob, with the prediction
    distribution from running the TorchScript artifact on it in batches of 512 rows.

    Raises ``InvalidInput`` naming the reference sample when it cannot be profiled.
    """
    from torchops.packaging import decode_arrays
    from torchops.runtime import load_runtime

    try:
        arrays = decode_arrays(reference)
        runtime = load_runtime("torchscript", torchscript, signature, warmup=False)
        try:
            n = min((v.shape[0] for v in arrays.values()), default=0)
            parts = [
                runtime.predict_batch({k: v[start : start + 512] for k, v in arrays.items()})
                for start in range(0, n, 512)
            ]
        finally:
            runtime.close()
        outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
        return build_profile(signature, arrays, outputs, bins=bins).to_bytes()
    except TorchopsError as exc:
        raise InvalidInput(f"cannot profile the reference sample: {exc.message}") from None
    except RuntimeError as exc:
        raise InvalidInput(f"the model failed on the reference sample: {exc}") from None
