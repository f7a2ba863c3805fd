from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from torchops.errors import Conflict, InvalidInput, NotFound
from torchops.monitoring import store
from torchops.monitoring.feedback import FeedbackResult, FeedbackStore, normalize_target
from torchops.monitoring.observations import ObservationStore, ObservationWriter
from torchops.registry import Registry
from torchops.types import ModelVersion

from .conftest import MakeObservation


def _feedback_rows(engine: Engine) -> list[tuple[str, Any]]:
    f = store.feedback
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(f.c.request_id, f.c.target).order_by(f.c.id))]


def _written(engine: Engine, make_observation: MakeObservation, *ids: str) -> ObservationWriter:
    writer = ObservationWriter(engine)
    for rid in ids:
        writer.put(make_observation("clf", rid))
    writer.flush()
    return writer


def test_feedback_before_the_observation_is_written_joins_after_the_write(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine, flush_interval_s=3600)
    writer.start()
    try:
        writer.put(make_observation("clf", "fresh"))
        assert "fresh" in writer.pending_ids("clf")
        FeedbackStore(engine, writer).add("clf", "fresh", "c")
        observations = ObservationStore(engine)
        assert observations.get("clf", "fresh") is None  # still only in the buffer
        writer.flush()
        got = observations.get("clf", "fresh")
        assert got is not None and got.label == 2
    finally:
        writer.close()


def test_late_feedback_after_a_restart_joins(
    database_url: str,
    tmp_path: Path,
    registry: Registry,
    classifier: ModelVersion,
    make_observation: MakeObservation,
) -> None:
    _written(registry.engine, make_observation, "old")
    registry.close()
    # a new process: new registry, engine and stores on the same database
    with Registry(tmp_path / "home", url=database_url) as again:
        FeedbackStore(again.engine).add("clf", "old", 1, source="cli")
        got = ObservationStore(again.engine).get("clf", "old")
        assert got is not None and got.label == 1
        with pytest.raises(Conflict):
            FeedbackStore(again.engine).add("clf", "old", 1)


def test_unknown_id_is_not_found_and_nothing_is_stored(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = _written(engine, make_observation, "known")
    with pytest.raises(NotFound, match="'nope'"):
        FeedbackStore(engine, writer).add("clf", "nope", 1)
    with pytest.raises(NotFound):
        FeedbackStore(engine, writer).add("other-model", "known", 1)
    assert _feedback_rows(engine) == []


def test_duplicate_feedback_conflicts_and_keeps_the_first(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = _written(engine, make_observation, "r1")
    feedback = FeedbackStore(engine, writer)
    feedback.add("clf", "r1", 0)
    with pytest.raises(Conflict, match="'r1'"):
        feedback.add("clf", "r1", 2)
    assert _feedback_rows(engine) == [("r1", 0)]


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        (3, "out of range"),
        (-1, "out of range"),
        ("z", "unknown class label"),
        (1.5, "class index or label"),
        (True, "class index or label"),
        ([1], "class index or label"),
        (None, "class index or label"),
    ],
)
def test_wrong_classification_target_is_invalid(
    engine: Engine,
    classifier: ModelVersion,
    make_observation: MakeObservation,
    target: Any,
    problem: str,
) -> None:
    writer = _written(engine, make_observation, "r1")
    with pytest.raises(InvalidInput, match=problem):
        FeedbackStore(engine, writer).add("clf", "r1", target)
    assert _feedback_rows(engine) == []


def test_classification_targets_are_stored_as_class_indices(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = _written(engine, make_observation, "a", "b", "c")
    feedback = FeedbackStore(engine, writer)
    feedback.add("clf", "a", "b")
    feedback.add("clf", "b", 2.0)
    feedback.add("clf", "c", 0)
    assert _feedback_rows(engine) == [("a", 1), ("b", 2), ("c", 0)]


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ([1.0], "shape \\[1\\]"),
        ([[1.0, 2.0]], "shape \\[1, 2\\]"),
        (1.0, "single number"),
        ("x", "expected a number or a list of shape \\[2\\]"),
        ([1.0, float("nan")], "finite"),
        ([1.0, "a"], "expected"),
    ],
)
def test_wrong_regression_target_is_invalid(
    engine: Engine,
    regressor: ModelVersion,
    make_observation: MakeObservation,
    target: Any,
    problem: str,
) -> None:
    writer = ObservationWriter(engine)
    writer.put(make_observation("reg", "r1"))
    writer.flush()
    with pytest.raises(InvalidInput, match=problem):
        FeedbackStore(engine, writer).add("reg", "r1", target)
    assert _feedback_rows(engine) == []
    FeedbackStore(engine, writer).add("reg", "r1", [0.5, 2])
    assert _feedback_rows(engine) == [("r1", [0.5, 2.0])]


def test_normalize_target_on_scalar_regression_outputs(regressor: ModelVersion) -> None:
    from dataclasses import replace

    from torchops.types import TensorSpec

    scalar = replace(regressor.signature, outputs=(TensorSpec("y", "float32", (-1, 1)),))
    assert normalize_target(scalar, 3) == 3.0
    assert normalize_target(scalar, [3]) == [3.0]
    with pytest.raises(InvalidInput):
        normalize_target(scalar, [3, 4])


def test_add_many_accepts_and_refuses_each_item_on_its_own(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = _written(engine, make_observation, "a", "b", "c", "d")
    writer.put(make_observation("clf", "buffered"))
    feedback = FeedbackStore(engine, writer)
    feedback.add("clf", "d", 0)
    result = feedback.add_many(
        "clf",
        [
            ("a", 0),  # ok
            ("b", 7),  # out of range
            ("zzz", 1),  # unknown
            ("c", "c"),  # ok
            ("a", 1),  # repeated in the batch
            ("d", 2),  # already given
            ("buffered", 1),  # ok: still in the writer's buffer
            ("broken",),  # not a pair
        ],  # type: ignore[list-item]
    )
    assert isinstance(result, FeedbackResult)
    assert result.accepted == 3
    assert [i for i, _ in result.errors] == [1, 2, 4, 5, 7]
    messages = dict(result.errors)
    assert "out of range" in messages[1]
    assert "'zzz'" in messages[2]
    assert "already given" in messages[4] and "already given" in messages[5]
    assert result.to_dict()["accepted"] == 3
    assert sorted(_feedback_rows(engine)) == [("a", 0), ("buffered", 1), ("c", 2), ("d", 0)]


def test_feedback_for_a_version_missing_from_the_registry_is_not_found(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    writer.put(make_observation("clf", "r1", version=9))
    writer.flush()
    with pytest.raises(NotFound, match="version 9"):
        FeedbackStore(engine, writer).add("clf", "r1", 0)


def test_bad_request_id_and_source_are_invalid(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = _written(engine, make_observation, "r1")
    feedback = FeedbackStore(engine, writer)
    with pytest.raises(InvalidInput):
        feedback.add("clf", "", 0)
    with pytest.raises(InvalidInput):
        feedback.add("clf", "r1", 0, source="")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(store.feedback)).scalar_one() == 0


def test_feedback_right_after_each_put_never_misses_while_the_writer_runs(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    # small batches and a short interval: observations keep moving from the buffer to the
    # batch in flight to the database while feedback looks for them
    writer = ObservationWriter(engine, batch_size=3, flush_interval_s=0.001)
    writer.start()
    feedback = FeedbackStore(engine, writer)
    try:
        for i in range(60):
            writer.put(make_observation("clf", f"r{i}"))
            feedback.add("clf", f"r{i}", i % 3)
        writer.flush()
    finally:
        writer.close()
    labelled = ObservationStore(engine).labelled("clf").observations
    assert [(o.request_id, o.label) for o in labelled] == [(f"r{i}", i % 3) for i in range(60)]
