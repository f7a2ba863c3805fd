from __future__ import annotations

import numpy as np

from torchops.quickstart.data import load_digits_data


def test_digits_are_scaled_split_and_stratified() -> None:
    data = load_digits_data(seed=0, test_fraction=0.25)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.n_features == 64 and data.n_classes == 10
    assert data.labels == tuple(str(i) for i in range(10))
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.x_test) == 450
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) == 1.0
    # stratified: every class keeps (about) its share in the test set
    train_share = np.bincount(data.y_train) / len(data.y_train)
    test_share = np.bincount(data.y_test) / len(data.y_test)
    assert np.max(np.abs(train_share - test_share)) < 0.01


def test_the_split_follows_the_seed() -> None:
    a, b, c = load_digits_data(seed=0), load_digits_data(seed=0), load_digits_data(seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
