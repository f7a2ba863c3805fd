"""The digits data scikit-learn ships: 1,797 8x8 images, no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from torchops.types import Array

__all__ = ["DigitsData", "load_digits_data"]


@dataclass(frozen=True, slots=True)
class DigitsData:
    """A stratified train/test split, pixels scaled to [0, 1] as float32, labels int64."""

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    labels: tuple[str, ...]

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.labels)


def load_digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """Load scikit-learn's digits and split them, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    labels = tuple(str(int(c)) for c in np.unique(y))
    return DigitsData(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
        labels=labels,
    )
