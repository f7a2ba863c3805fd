"""scikit-learn's bundled digits (no download), split once, and a classifier fitted on them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB

from torchops.types import Array, Signature, TensorSpec

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "float32", (-1, 64)),),
    outputs=(TensorSpec("output", "float32", (-1, 10)),),
    task="classification",
    labels=tuple(str(i) for i in range(10)),
)


@dataclass(frozen=True)
class Digits:
    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    model: GaussianNB

    def proba(self, x: Array) -> Array:
        """Class probabilities of the classifier: the model's ``output``."""
        return np.asarray(self.model.predict_proba(x / 16.0), dtype=np.float32)


@cache
def digits() -> Digits:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y
    )
    model = GaussianNB(var_smoothing=0.01).fit(x_train / 16.0, y_train)
    return Digits(x_train, y_train, x_test, y_test, model)
