from __future__ import annotations

import time

import numpy as np

from torchops.monitoring._batches import Batch
from torchops.monitoring._capture import ObservedBatch
from torchops.monitoring._live import LiveVersion
from torchops.monitoring._record import RowRule
from torchops.monitoring.drift import DriftConfig
from torchops.monitoring.profiles import build_profile
from torchops.types import Signature, TensorSpec

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "float32", (-1, 3)),),
    outputs=(TensorSpec("y", "float32", (-1, 4)),),
    task="classification",
)


def _live(window: int) -> LiveVersion:
    rng = np.random.default_rng(0)
    reference = {"x": rng.standard_normal((400, 3)).astype(np.float32)}
    outputs = {"y": rng.standard_normal((400, 4)).astype(np.float32)}
    return LiveVersion(
        "m",
        1,
        SIGNATURE,
        build_profile(SIGNATURE, reference, outputs),
        quality_window=100,
        quality_window_seconds=60.0,
        drift_window=window,
        drift_config=DriftConfig(),
    )


def _batch(rows: int, first: int, *, inputs: bool = True) -> Batch:
    """``rows`` rows whose inputs are their row numbers and whose class is row % 4."""
    x = np.repeat(np.arange(first, first + rows, dtype=np.float32)[:, None], 3, axis=1)
    y = np.zeros((rows, 4), np.float32)
    y[np.arange(rows), np.arange(first, first + rows) % 4] = 1.0
    now = time.monotonic()
    observed = ObservedBatch(
        "m", 1, list(range(first, first + rows)), None, time.time(), [now] * rows, now,
        {"y": y}, {"x": x} if inputs else None, RowRule(SIGNATURE, trusted=True),
    )  # fmt: skip
    return Batch.build([observed], "p")


def test_windows_fill_across_batches_and_superseded_ones_are_only_counted() -> None:
    live = _live(window=100)
    live.add_written([_batch(60, 0)])
    assert (live.filled, live.drift is not None and live.drift.rows) == (0, 60)
    live.add_written([_batch(60, 60)])  # the first window: rows 0-99
    assert live.filled == 1 and live.full is not None
    np.testing.assert_array_equal(live.full.features[:, 0], np.arange(100))
    # 20 waiting + 1,030 new rows: windows end at rows 199, 299, …, 1099; only the last
    # full one (rows 1000-1099) is kept, and 1100-1149 start the next
    live.add_written([_batch(1030, 120)])
    assert live.filled == 11
    np.testing.assert_array_equal(live.full.features[:, 0], np.arange(1000, 1100))
    np.testing.assert_array_equal(live.full.predictions, np.arange(1000, 1100) % 4)
    assert live.drift is not None and live.drift.rows == 50
    np.testing.assert_array_equal(live.drift.features[:50, 0], np.arange(1100, 1150))
    report = live.drift_report()
    assert report is not None and report.rows == 100


def test_rows_without_inputs_count_as_missing_features() -> None:
    live = _live(window=10)
    live.add_written([_batch(5, 0, inputs=False), _batch(25, 5)])
    # windows 0-9, 10-19, 20-29: the last full one has inputs for every row
    assert live.filled == 3 and live.full is not None
    np.testing.assert_array_equal(live.full.features[:, 0], np.arange(20, 30))
    live.add_written([_batch(4, 30, inputs=False), _batch(6, 34)])
    assert live.filled == 4
    features = live.full.features[:, 0]
    assert np.isnan(features[:4]).all()
    np.testing.assert_array_equal(features[4:], np.arange(34, 40))
    np.testing.assert_array_equal(live.full.predictions, np.arange(30, 40) % 4)
