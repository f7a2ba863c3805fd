from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from torchops.errors import InvalidInput
from torchops.monitoring.snapshots import SnapshotStore
from torchops.registry import Registry
from torchops.registry.store import utcnow


def test_history_is_filtered_and_oldest_first(engine: Engine) -> None:
    snapshots = SnapshotStore(engine)
    start = utcnow() - timedelta(minutes=10)
    for i in range(4):
        snapshots.write(
            "clf",
            1,
            "quality",
            "cumulative",
            {"accuracy": 0.5 + i / 10},
            at=start + timedelta(minutes=i),
        )
    snapshots.write("clf", 2, "quality", "last_1000", {"accuracy": 0.99})
    snapshots.write("clf", 1, "drift", "last_1000", {"drifted_share": 0.25, "features": []})
    snapshots.write("other", 1, "quality", "cumulative", {"accuracy": 0.1})

    v1 = snapshots.history("clf", 1, "quality")
    assert [s.values["accuracy"] for s in v1] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert [s.at for s in v1] == [start + timedelta(minutes=i) for i in range(4)]
    assert {(s.model, s.version, s.kind, s.window) for s in v1} == {
        ("clf", 1, "quality", "cumulative")
    }
    latest = snapshots.history("clf", 1, "quality", limit=2)
    assert [s.values["accuracy"] for s in latest] == pytest.approx([0.7, 0.8])
    assert [s.kind for s in snapshots.history("clf")] == ["quality"] * 5 + ["drift"]
    assert [s.version for s in snapshots.history("clf", kind="quality", window="last_1000")] == [2]
    assert snapshots.history("clf", 1, "drift")[0].to_dict()["values"]["drifted_share"] == 0.25
    assert snapshots.history("nobody") == []


def test_non_finite_and_numpy_values_are_stored_as_json(engine: Engine) -> None:
    snapshots = SnapshotStore(engine)
    values = {"log_loss": float("nan"), "rmse": np.float32(1.5), "confusion": np.eye(2, dtype=int)}
    snapshots.write("clf", 1, "quality", "cumulative", values)
    (stored,) = snapshots.history("clf")
    assert stored.values == {"log_loss": None, "rmse": 1.5, "confusion": [[1, 0], [0, 1]]}


def test_bad_snapshots_are_refused_and_nothing_is_stored(engine: Engine) -> None:
    snapshots = SnapshotStore(engine)
    with pytest.raises(InvalidInput, match="kind"):
        snapshots.write("clf", 1, "speed", "cumulative", {})
    with pytest.raises(InvalidInput, match="version"):
        snapshots.write("clf", 0, "quality", "cumulative", {})
    with pytest.raises(InvalidInput, match="JSON"):
        snapshots.write("clf", 1, "quality", "cumulative", {"x": object()})
    with pytest.raises(InvalidInput):
        snapshots.write("bad name", 1, "quality", "cumulative", {})
    assert snapshots.history("clf") == []


def test_snapshots_survive_a_restart(database_url: str, tmp_path: Path, registry: Registry) -> None:
    SnapshotStore(registry.engine).write("clf", 1, "quality", "cumulative", {"accuracy": 0.9})
    registry.close()
    with Registry(tmp_path / "home", url=database_url) as again:
        (snapshot,) = SnapshotStore(again.engine).history("clf")
        assert snapshot.values == {"accuracy": 0.9}
