from __future__ import annotations

import numpy as np
import pytest

from torchops.errors import InvalidInput
from torchops.learning.replay import ReplayBuffer


def rows(ids: np.ndarray, width: int = 4) -> dict[str, np.ndarray]:
    """Inputs whose every value is the row id, so a sampled row tells where it came from."""
    return {"x": np.repeat(ids.astype(np.float32)[:, None], width, axis=1)}


def test_rejects_and_counts_non_finite_and_out_of_range_rows() -> None:
    buffer = ReplayBuffer(n_classes=10)
    x = rows(np.arange(8))
    x["x"][1, 2] = np.nan
    x["x"][2, 0] = np.inf
    x["x"][3, 3] = -np.inf
    y = np.array([0, 1, 2, 3, 10, -1, 9, 2.5])
    accepted = buffer.add(x, y)
    assert accepted == 2  # rows 0 and 6
    assert buffer.rejected == 6
    assert buffer.seen == 2
    assert len(buffer) == 2
    _, targets, soft = buffer.sample(50, rng=np.random.default_rng(0))
    assert set(targets.argmax(axis=1).tolist()) == {0, 9}
    assert not soft.any()


def test_rejects_non_finite_regression_targets_and_values_beyond_max_abs() -> None:
    buffer = ReplayBuffer(task="regression", max_abs=100.0)
    x = rows(np.arange(4))
    x["x"][3, 0] = 1e6
    accepted = buffer.add(x, np.array([1.0, np.nan, np.inf, 2.0]))
    assert accepted == 1
    assert buffer.rejected == 3


def test_a_malformed_call_raises_and_stores_nothing() -> None:
    buffer = ReplayBuffer(n_classes=3)
    buffer.add(rows(np.arange(3)), np.array([0, 1, 2]))
    before = (len(buffer), buffer.rejected, buffer.seen)
    with pytest.raises(InvalidInput, match="'x'"):
        buffer.add(rows(np.arange(3), width=5), np.array([0, 1, 2]))
    with pytest.raises(InvalidInput, match="do not match"):
        buffer.add({"z": np.zeros((3, 4), np.float32)}, np.array([0, 1, 2]))
    with pytest.raises(InvalidInput, match="rows"):
        buffer.add(rows(np.arange(2)), np.array([0, 1, 2]))
    with pytest.raises(InvalidInput, match="one class index"):
        buffer.add(rows(np.arange(3)), np.zeros((3, 3)))
    assert (len(buffer), buffer.rejected, buffer.seen) == before


def test_recent_keeps_the_last_rows_and_the_reservoir_only_older_ones() -> None:
    buffer = ReplayBuffer(recent=10, reservoir=1000, recent_fraction=1.0, task="regression")
    ids = np.arange(100)
    buffer.add(rows(ids), ids.astype(np.float32))
    assert buffer.n_recent == 10 and buffer.n_reservoir == 90
    assert sorted(buffer.reservoir_targets().tolist()) == list(range(90))
    x, y, _ = buffer.sample(200, rng=np.random.default_rng(1))
    assert set(y.tolist()) <= set(range(90, 100))
    assert np.array_equal(x["x"][:, 0], y)  # inputs and targets stay paired


def test_reservoir_is_a_uniform_sample_of_the_stream() -> None:
    """Algorithm R: every row of the stream ends in the reservoir with probability k/N."""
    n, k, trials, buckets = 1000, 50, 200, 10
    counts = np.zeros(buckets)
    ids = np.arange(n)
    for seed in range(trials):
        buffer = ReplayBuffer(recent=0, reservoir=k, task="regression", seed=seed)
        for start in range(0, n, 100):
            chunk = ids[start : start + 100]
            buffer.add(rows(chunk, width=1), chunk.astype(np.float32))
        kept = buffer.reservoir_targets().astype(int)
        assert len(kept) == k and len(set(kept.tolist())) == k
        counts += np.bincount(kept // (n // buckets), minlength=buckets)
    expected = trials * k / buckets
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 9 degrees of freedom: P(chi2 > 27.88) = 0.001 for a uniform sample
    assert chi2 < 27.88, counts
    # and not trivially: the first and the last tenth of the stream are both well kept
    assert counts[0] > 0.8 * expected and counts[-1] > 0.8 * expected


def test_sample_mixes_anchors_recent_and_reservoir() -> None:
    buffer = ReplayBuffer(
        recent=10, reservoir=100, recent_fraction=0.5, anchor_fraction=0.25, n_classes=10
    )
    ids = np.arange(60)
    buffer.add(rows(ids), ids % 10)
    anchors = rows(np.full(5, 1000))
    soft = np.full((5, 10), 0.1, dtype=np.float32)
    buffer.add_anchor(anchors, soft)
    assert buffer.n_anchors == 5 and len(buffer) == 65
    x, y, is_soft = buffer.sample(200, rng=np.random.default_rng(2))
    values = x["x"][:, 0]
    assert is_soft.sum() == 50
    assert np.all(values[is_soft] == 1000)
    assert np.allclose(y[is_soft], 0.1)
    hard = y[~is_soft]
    assert np.allclose(hard.sum(axis=1), 1.0) and set(np.unique(hard).tolist()) == {0.0, 1.0}
    assert np.array_equal(hard.argmax(axis=1), values[~is_soft].astype(int) % 10)
    from_recent = values[~is_soft] >= 50
    assert from_recent.sum() == 75


def test_anchor_validation() -> None:
    buffer = ReplayBuffer(n_classes=3)
    x = rows(np.arange(2))
    with pytest.raises(InvalidInput, match="probabilities"):
        buffer.add_anchor(x, np.array([[0.5, 0.6, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(InvalidInput, match="3 class"):
        buffer.add_anchor(x, np.full((2, 4), 0.25))
    bad = rows(np.arange(2))
    bad["x"][0, 0] = np.nan
    with pytest.raises(InvalidInput):
        buffer.add_anchor(bad, np.full((2, 3), 1 / 3))
    assert buffer.n_anchors == 0


def test_n_classes_from_anchors_and_empty_buffer() -> None:
    buffer = ReplayBuffer()
    with pytest.raises(InvalidInput, match="empty"):
        buffer.sample(4)
    buffer.add_anchor(rows(np.arange(2)), np.full((2, 4), 0.25))
    assert buffer.n_classes == 4
    assert buffer.add(rows(np.arange(3)), np.array([0, 3, 4])) == 2
    with pytest.raises(InvalidInput):
        ReplayBuffer(recent=0, reservoir=0)
    with pytest.raises(InvalidInput):
        ReplayBuffer(recent_fraction=1.5)
