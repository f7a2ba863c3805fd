from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from sqlalchemy import Engine, Table, func, select

from torchops.errors import InvalidInput, Unavailable
from torchops.monitoring import _capture as capture_module
from torchops.monitoring import observations as observations_module
from torchops.monitoring import store
from torchops.monitoring._batches import Batch
from torchops.monitoring._capture import Capture
from torchops.monitoring._record import RowRule
from torchops.monitoring.feedback import FeedbackStore
from torchops.monitoring.observations import (
    ObservationStore,
    ObservationWriter,
    ObservedBatch,
)
from torchops.registry import Registry
from torchops.registry.store import utcnow
from torchops.types import ModelVersion

from .conftest import MakeObservation


def _rows(engine: Engine) -> int:
    """Observations stored, summed over the stored batches."""
    b = store.observation_batches
    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(b.c.rows), 0))).scalar_one())


def _count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _ids(batches: Sequence[Batch]) -> list[str]:
    return [rid for batch in batches for rid in batch.row_ids()]


def test_writer_stores_one_batch_per_version_and_flush(
    engine: Engine, make_observation: MakeObservation
) -> None:
    written: list[list[tuple[int, int]]] = []
    writer = ObservationWriter(
        engine, on_write=lambda bs: written.append([(b.version, len(b)) for b in bs])
    )
    for i in range(23):
        assert writer.put(make_observation("clf", f"r{i}", version=1 + (i >= 20)))
    assert _rows(engine) == 0  # nothing touches the database before the writer runs
    writer.flush()
    assert written == [[(1, 20), (2, 3)]]
    assert writer.written == 23 and writer.dropped == 0
    assert _rows(engine) == 23 and _count(engine, store.observation_batches) == 2


def test_writer_thread_writes_and_flush_waits(
    engine: Engine, make_observation: MakeObservation
) -> None:
    batches: list[Batch] = []
    threads: set[str] = set()

    def seen(stored: Sequence[Batch]) -> None:
        batches.extend(stored)
        threads.add(threading.current_thread().name)

    # a long interval: only the batch-size wake-up and flush make it write
    writer = ObservationWriter(engine, batch_size=4, flush_interval_s=3600, on_write=seen)
    writer.start()
    try:
        ids = [f"r{i}" for i in range(10)]
        for rid in ids:
            writer.put(make_observation("clf", rid))
        writer.flush()
        assert _rows(engine) == 10
        assert writer.pending_ids("clf") == set()
        assert threads == {"torchops-observations"}
        assert _ids(batches) == ids
    finally:
        writer.close()


def test_the_writer_loop_leaves_rows_that_came_during_a_write_for_its_next_turn(
    engine: Engine, make_observation: MakeObservation
) -> None:
    stored: list[int] = []
    arriving = [3, 6, 2]  # rows put while each write is under way

    def during(batches: Sequence[Batch]) -> None:
        stored.append(sum(len(b) for b in batches))
        for i in range(arriving.pop(0) if arriving else 0):
            writer.put(make_observation("clf", f"w{len(stored)}-{i}"))

    writer = ObservationWriter(engine, batch_size=5, flush_interval_s=3600, on_write=during)
    for i in range(2):
        writer.put(make_observation("clf", f"r{i}"))
    writer._drain(everything=False)  # one turn of the writer thread's loop
    # the 3 rows that came during the write are fewer than batch_size: they wait
    assert stored == [2] and writer.buffered == 3
    writer._drain(everything=False)
    # 6 came during that write: enough for a batch, so the loop went on, then left 2
    assert stored == [2, 3, 6] and writer.buffered == 2
    writer.flush()  # flush writes everything, whatever comes meanwhile
    assert stored == [2, 3, 6, 2] and writer.buffered == 0
    assert _rows(engine) == 13


def test_full_buffer_drops_and_counts(engine: Engine, make_observation: MakeObservation) -> None:
    drops: list[tuple[str, int]] = []
    writer = ObservationWriter(
        engine, max_buffer=10, on_drop=lambda model, n: drops.append((model, n))
    )
    accepted = [writer.put(make_observation("clf", f"r{i}")) for i in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert writer.dropped == 5
    assert drops == [("clf", 1)] * 5
    assert writer.pending_ids("clf") == {f"r{i}" for i in range(10)}
    writer.flush()
    assert writer.written == 10
    assert _rows(engine) == 10
    # room again once written
    assert writer.put(make_observation("clf", "later"))


def test_put_after_close_is_dropped(engine: Engine, make_observation: MakeObservation) -> None:
    writer = ObservationWriter(engine)
    writer.start()
    writer.put(make_observation("clf", "a"))
    writer.close()
    assert _rows(engine) == 1  # close writes what was buffered
    assert writer.put(make_observation("clf", "b")) is False
    assert writer.dropped == 1
    with pytest.raises(Unavailable):
        writer.start()


def test_round_trip_of_arrays_prediction_and_proba(
    engine: Engine, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    obs = make_observation(
        "clf",
        "r1",
        prediction=np.int64(2),
        outputs={"output": np.array([[0.1, 0.2, 0.7]], dtype=np.float32)},
        inputs={"input": np.array([[1, 2, 3, 4]], dtype=np.float32)},
    )
    writer.put(obs)
    writer.flush()
    got = ObservationStore(engine).get("clf", "r1")
    assert got is not None
    assert (got.request_id, got.model, got.version, got.prediction) == ("r1", "clf", 1, 2)
    assert got.at == obs.at and got.latency_s == obs.latency_s
    assert got.proba == [0.5, 0.25, 0.25]
    np.testing.assert_array_equal(got.outputs["output"], obs.outputs["output"])
    assert got.inputs is not None
    np.testing.assert_array_equal(got.inputs["input"], [[1, 2, 3, 4]])
    assert got.label is None
    assert ObservationStore(engine).get("clf", "missing") is None


def test_big_inputs_are_sampled_small_ones_kept(
    engine: Engine, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine, max_input_values=4, input_sample_rate=0.0)
    writer.put(make_observation("clf", "small", inputs={"x": np.zeros((1, 4), np.float32)}))
    writer.put(make_observation("clf", "big", inputs={"x": np.zeros((1, 8), np.float32)}))
    # 8 values over 2 rows is 4 per row: small enough
    writer.put(make_observation("clf", "two", inputs={"x": np.zeros((2, 4), np.float32)}))
    writer.flush()
    observations = ObservationStore(engine)
    small, big, two = (observations.get("clf", rid) for rid in ("small", "big", "two"))
    assert small is not None and small.inputs is not None
    assert big is not None and big.inputs is None
    assert big.outputs  # the prediction itself is still kept
    assert two is not None and two.inputs is not None


def test_duplicate_request_id_keeps_the_first(
    engine: Engine, make_observation: MakeObservation
) -> None:
    drops: list[tuple[str, int]] = []
    writer = ObservationWriter(engine, on_drop=lambda m, n: drops.append((m, n)))
    writer.put(make_observation("clf", "same", prediction=1))
    writer.flush()
    writer.put(make_observation("clf", "same", prediction=2))
    writer.put(make_observation("clf", "other"))
    writer.flush()
    assert _rows(engine) == 2
    assert writer.written == 2 and writer.dropped == 1 and drops == [("clf", 1)]
    got = ObservationStore(engine).get("clf", "same")
    assert got is not None and got.prediction == 1


def test_unencodable_observation_is_dropped_alone(
    engine: Engine, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    writer.put(make_observation("clf", "bad", outputs={"output": np.array([["text"]])}))
    writer.put(make_observation("clf", "naive", at=datetime(2024, 1, 1)))
    writer.put(make_observation("clf", "x" * 257))
    writer.put(make_observation("bad model!", "r"))
    writer.put(make_observation("clf", "good"))
    writer.flush()
    assert writer.dropped == 4 and writer.written == 1
    assert ObservationStore(engine).get("clf", "good") is not None


def test_writer_rejects_bad_settings(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="max_buffer"):
        ObservationWriter(engine, max_buffer=0)
    with pytest.raises(InvalidInput, match="input_sample_rate"):
        ObservationWriter(engine, input_sample_rate=1.5)


def test_observations_pages_with_cursor_and_filters(
    engine: Engine, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    old = utcnow() - timedelta(hours=2)
    for i in range(6):
        writer.put(make_observation("clf", f"r{i}", version=1 + i % 2, at=old if i < 2 else None))
    writer.put(make_observation("other", "x"))
    writer.flush()
    observations = ObservationStore(engine)
    # a flush stores each version's observations together, in the order they came
    first = observations.observations("clf", limit=4)
    assert [o.request_id for o in first.observations] == ["r0", "r2", "r4", "r1"]
    rest = observations.observations("clf", since_id=first.cursor)
    assert [o.request_id for o in rest.observations] == ["r3", "r5"]
    assert observations.observations("clf", since_id=rest.cursor) == ([], rest.cursor)
    v2 = observations.observations("clf", 2)
    assert [o.request_id for o in v2.observations] == ["r1", "r3", "r5"]
    recent = observations.observations("clf", since=utcnow() - timedelta(hours=1))
    assert [o.request_id for o in recent.observations] == ["r2", "r4", "r3", "r5"]
    light = observations.observations("clf", arrays=False, limit=1).observations[0]
    assert light.outputs == {} and light.inputs is None and light.prediction == 0
    assert observations.count("clf") == 6 and observations.count("clf", 2) == 3


def test_labelled_reads_incrementally_in_feedback_order(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    for i in range(5):
        writer.put(make_observation("clf", f"r{i}"))
    writer.flush()
    feedback = FeedbackStore(engine, writer)
    observations = ObservationStore(engine)
    feedback.add("clf", "r3", 2)
    feedback.add("clf", "r1", "b")
    page = observations.labelled("clf")
    assert [(o.request_id, o.label) for o in page.observations] == [("r3", 2), ("r1", 1)]
    assert observations.labelled("clf", since_id=page.cursor) == ([], page.cursor)
    feedback.add("clf", "r0", 0)
    later = observations.labelled("clf", since_id=page.cursor)
    assert [(o.request_id, o.label) for o in later.observations] == [("r0", 0)]
    assert later.cursor > page.cursor
    limited = observations.labelled("clf", limit=2, arrays=False)
    assert [o.request_id for o in limited.observations] == ["r3", "r1"]
    assert observations.count("clf", labelled=True) == 3


def test_labelled_waits_for_an_observation_still_in_the_buffer(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    writer.put(make_observation("clf", "written"))
    writer.flush()
    writer.put(make_observation("clf", "buffered"))
    feedback = FeedbackStore(engine, writer)
    feedback.add("clf", "buffered", 1)  # before its observation is written
    feedback.add("clf", "written", 2)
    observations = ObservationStore(engine)
    page = observations.labelled("clf")
    # the cursor stops before the unjoined feedback, so nothing is skipped
    assert (page.observations, page.cursor) == ([], 0)
    writer.flush()
    page = observations.labelled("clf", since_id=page.cursor)
    assert [(o.request_id, o.label) for o in page.observations] == [
        ("buffered", 1),
        ("written", 2),
    ]
    # once the grace period is over, feedback whose observation never came is stepped over
    writer.put(make_observation("clf", "lost"))
    feedback.add("clf", "lost", 0)
    impatient = ObservationStore(engine, join_grace_s=0)
    assert impatient.labelled("clf", since_id=page.cursor).observations == []
    assert impatient.labelled("clf", since_id=page.cursor).cursor > page.cursor
    writer.close()


def test_labelled_filters_by_version(
    engine: Engine, registry: Registry, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    registry.register(
        "clf",
        torch.nn.Linear(4, 3),
        torch.zeros(2, 4),
        formats=("torchscript",),
        labels=["a", "b", "c"],
    )
    writer = ObservationWriter(engine)
    writer.put(make_observation("clf", "v1"))
    writer.put(make_observation("clf", "v2", version=2))
    writer.flush()
    feedback = FeedbackStore(engine, writer)
    feedback.add("clf", "v1", 0)
    feedback.add("clf", "v2", 1)
    observations = ObservationStore(engine)
    assert [o.request_id for o in observations.labelled("clf", 2).observations] == ["v2"]
    assert [o.request_id for o in observations.labelled("clf", 1).observations] == ["v1"]


def test_retention_by_age_removes_old_observations_and_their_feedback(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    old = utcnow() - timedelta(days=3)
    for i in range(5):
        writer.put(make_observation("clf", f"old{i}", at=old))
    for i in range(3):
        writer.put(make_observation("clf", f"new{i}"))
    writer.flush()
    feedback = FeedbackStore(engine, writer)
    feedback.add("clf", "old0", 1)
    feedback.add("clf", "new0", 2)
    observations = ObservationStore(engine)
    assert observations.apply_retention(max_age=timedelta(days=1)) == 5
    assert _rows(engine) == 3
    assert observations.get("clf", "old0") is None
    assert _count(engine, store.feedback) == 1
    labelled = observations.labelled("clf").observations
    assert [(o.request_id, o.label) for o in labelled] == [("new0", 2)]
    assert observations.apply_retention(max_age=timedelta(days=1)) == 0
    with pytest.raises(InvalidInput):
        observations.apply_retention(max_age=timedelta(0))


def test_retention_by_count_keeps_the_newest_per_model(
    engine: Engine, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    for i in range(7):
        writer.put(make_observation("clf", f"c{i}"))
    for i in range(2):
        writer.put(make_observation("other", f"o{i}"))
    writer.flush()
    observations = ObservationStore(engine)
    assert observations.apply_retention(max_rows=3) == 4
    kept = observations.observations("clf").observations
    assert [o.request_id for o in kept] == ["c4", "c5", "c6"]
    assert observations.count("other") == 2
    assert observations.apply_retention(max_rows=0) == 5
    assert _rows(engine) == 0
    with pytest.raises(InvalidInput):
        observations.apply_retention(max_rows=-1)


def test_duplicates_within_one_batch_keep_the_first(
    engine: Engine, make_observation: MakeObservation
) -> None:
    drops: list[tuple[str, int]] = []
    written: list[list[str]] = []
    writer = ObservationWriter(
        engine,
        on_drop=lambda m, n: drops.append((m, n)),
        on_write=lambda b: written.append(_ids(b)),
    )
    writer.put(make_observation("clf", "a"))
    writer.put(make_observation("clf", "same", prediction=1))
    writer.put(make_observation("clf", "same", prediction=2))
    writer.put(make_observation("clf", "b"))
    writer.flush()
    assert _rows(engine) == 3
    assert writer.written == 3 and writer.dropped == 1 and drops == [("clf", 1)]
    assert written == [["a", "same", "b"]]  # the loser is not passed on
    got = ObservationStore(engine).get("clf", "same")
    assert got is not None and got.prediction == 1


def test_a_batch_the_database_refuses_is_dropped_and_counted(
    engine: Engine, make_observation: MakeObservation
) -> None:
    drops: list[tuple[str, int]] = []
    writer = ObservationWriter(engine, on_drop=lambda m, n: drops.append((m, n)))
    writer.put(make_observation("clf", "kept"))
    writer.flush()
    # a version beyond the INTEGER column's range: the database rejects that stored batch
    writer.put(make_observation("clf", "r1"))
    writer.put(make_observation("clf", "r2", version=2**70))
    writer.put(make_observation("clf", "r3", version=2**70))
    writer.flush()
    assert (writer.written, writer.dropped, drops) == (2, 2, [("clf", 2)])
    assert _rows(engine) == 2  # the other version's batch of the same flush went in
    writer.put(make_observation("clf", "r4"))  # the writer keeps going afterwards
    writer.flush()
    assert writer.written == 3 and _rows(engine) == 3


def test_given_predictions_read_back_as_json_values(
    engine: Engine, make_observation: MakeObservation
) -> None:
    at = datetime(2030, 5, 6, 7, 8, 9, 12, tzinfo=UTC)
    obs = [
        replace(make_observation("clf", "none", at=at, prediction=None), proba=None),
        replace(
            make_observation("clf", "odd", at=at + timedelta(microseconds=1), prediction=[1.5]),
            proba=[0.5, float("nan"), float("inf")],
        ),
        replace(  # numpy values and integer keys: not plain JSON, unwrapped
            make_observation("clf", "numpy", at=at, prediction={1: np.int64(2)}),
            proba=np.array([0.25, 0.75]),  # type: ignore[arg-type]  # what callers may pass
        ),
    ]
    writer = ObservationWriter(engine)
    for o in obs:
        writer.put(o)
    writer.flush()
    observations = ObservationStore(engine)
    page = observations.observations("clf", since=at + timedelta(microseconds=1), arrays=False)
    assert [o.request_id for o in page.observations] == ["odd"]
    got = {o.request_id: o for o in observations.observations("clf", arrays=False)[0]}
    assert got["none"].prediction is None and got["none"].proba is None
    assert got["odd"].prediction == [1.5] and got["odd"].proba == [0.5, None, None]
    assert got["numpy"].prediction == {"1": 2} and got["numpy"].proba == [0.25, 0.75]
    assert got["none"].at == at and got["odd"].at == at + timedelta(microseconds=1)


def test_server_batches_name_requests_by_number_and_index_only_client_ids(
    engine: Engine, classifier: ModelVersion
) -> None:
    rule = RowRule(classifier.signature)
    writer = ObservationWriter(engine, id_prefix="srv")
    scores = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.1, 0.2, 0.7], [1.0, 1.0, 5.0]])
    inputs = np.arange(16, dtype=np.float32).reshape(4, 4)
    # request 7 of three rows, then a client-chosen id of one row
    writer.put_batch(
        ObservedBatch(
            "clf", 1, [7, "client-1"], [3, 1], 1e9, [10.0, 10.5], 10.75,
            {"output": scores.astype(np.float32)}, {"input": inputs}, rule,
        )
    )  # fmt: skip
    assert writer.pending_versions("clf", ["srv-7/2", "client-1", "srv-7", "nope"]) == {
        "srv-7/2": 1,
        "client-1": 1,
    }
    assert writer.pending("clf", "srv-7/1") is not None
    writer.flush()
    observations = ObservationStore(engine)
    assert observations.versions("clf", ["srv-7/0", "srv-7/2", "client-1", "srv-7", "srv-8/0"]) == {
        "srv-7/0": 1,
        "srv-7/2": 1,
        "client-1": 1,
    }
    assert _count(engine, store.observation_ids) == 1  # generated ids need no index row
    row = observations.get("clf", "srv-7/2")
    assert row is not None and row.latency_s == pytest.approx(0.75)
    np.testing.assert_array_equal(row.inputs["input"], inputs[2:3])  # type: ignore[index]
    # predictions are not stored: they follow from the outputs by the version's rule
    assert row.prediction == 2 and row.proba == pytest.approx([0.1, 0.2, 0.7])  # already sums to 1
    client = observations.get("clf", "client-1")
    assert client is not None and client.prediction == 2
    assert client.proba == pytest.approx(np.exp([1, 1, 5]) / np.exp([1, 1, 5]).sum())
    first = observations.get("clf", "srv-7/0")
    assert first is not None and first.latency_s == pytest.approx(0.75) and first.prediction == 1
    with engine.connect() as conn:
        stored = conn.execute(select(store.observation_batches.c.predictions)).scalar_one()
    assert stored is None


def test_a_flush_is_stored_in_batches_of_bounded_size(
    engine: Engine, make_observation: MakeObservation, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each observation holds 3 + 4 float32 values: 28 bytes
    monkeypatch.setattr(observations_module, "MAX_STORED_BYTES", 100)
    sizes: list[int] = []
    writer = ObservationWriter(engine, on_write=lambda bs: sizes.extend(len(b) for b in bs))
    for i in range(10):
        writer.put(make_observation("clf", f"r{i}"))
    writer.flush()
    assert sizes == [3, 3, 3, 1]
    assert [o.request_id for o in ObservationStore(engine).observations("clf")[0]] == [
        f"r{i}" for i in range(10)
    ]


def test_generated_ids_far_apart_are_indexed_and_old_ones_found_among_many_batches(
    engine: Engine, classifier: ModelVersion
) -> None:
    rule = RowRule(classifier.signature, trusted=True)
    writer = ObservationWriter(engine, id_prefix="srv")

    def put(numbers: list[int]) -> None:
        rows = len(numbers)
        writer.put_batch(
            ObservedBatch(
                "clf", 1, numbers, None, 1e9, [0.0] * rows, 0.001,
                {"output": np.zeros((rows, 3), np.float32)},
                {"input": np.zeros((rows, 4), np.float32)}, rule,
            )
        )  # fmt: skip
        writer.flush()

    put([5, 6])
    for start in range(100, 100 + 30 * store.ID_SPAN // 2, store.ID_SPAN // 2):
        put([start, start + 1])  # 30 later stored batches, each a narrow range
    put([7, 7 + store.ID_SPAN])  # a straggler: too wide for a range
    assert _count(engine, store.observation_ids) == 2  # only the wide batch is indexed
    found = ObservationStore(engine).versions("clf", ["srv-5", "srv-6", "srv-7", "srv-8"])
    assert found == {"srv-5": 1, "srv-6": 1, "srv-7": 1}
    wide = ObservationStore(engine).get("clf", f"srv-{7 + store.ID_SPAN}")
    assert wide is not None and wide.request_id == f"srv-{7 + store.ID_SPAN}"


def test_pages_end_inside_a_stored_batch_and_resume_there(
    engine: Engine, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    for flush in range(3):
        for i in range(4):
            writer.put(make_observation("clf", f"r{flush}{i}"))
        writer.flush()
    observations = ObservationStore(engine)
    seen: list[str] = []
    cursor = 0
    while True:
        page = observations.observations("clf", since_id=cursor, limit=3, arrays=False)
        if not page.observations:
            break
        seen += [o.request_id for o in page.observations]
        cursor = page.cursor
    assert seen == [f"r{f}{i}" for f in range(3) for i in range(4)]
    assert observations.latest_cursor("clf") == cursor
    assert observations.observations("clf", since_id=observations.latest_cursor("clf")) == (
        [],
        cursor,
    )


def test_retention_by_count_trims_inside_a_batch_with_its_ids_and_feedback(
    engine: Engine, classifier: ModelVersion, make_observation: MakeObservation
) -> None:
    writer = ObservationWriter(engine)
    for i in range(6):
        writer.put(make_observation("clf", f"c{i}"))
    writer.flush()
    feedback = FeedbackStore(engine, writer)
    feedback.add("clf", "c1", 1)
    feedback.add("clf", "c4", 2)
    observations = ObservationStore(engine)
    assert observations.apply_retention(max_rows=4) == 2
    assert [o.request_id for o in observations.observations("clf")[0]] == [
        "c2",
        "c3",
        "c4",
        "c5",
    ]
    assert observations.get("clf", "c1") is None
    got = observations.get("clf", "c4")
    assert got is not None and got.label == 2
    assert _count(engine, store.observation_ids) == 4 and _count(engine, store.feedback) == 1


def _scores(rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"output": np.random.default_rng(seed).standard_normal((rows, 3)).astype(np.float32)}


def _inputs(rows: int, start: int) -> dict[str, np.ndarray]:
    return {"input": np.arange(start * 4, (start + rows) * 4, dtype=np.float32).reshape(rows, 4)}


def test_server_rows_are_gathered_per_version_and_read_back_like_batches(
    engine: Engine, classifier: ModelVersion
) -> None:
    rule = RowRule(classifier.signature, trusted=True)
    assert rule.fixed
    written: list[Batch] = []
    writer = ObservationWriter(engine, id_prefix="srv", on_write=written.extend)
    # model batch 1: requests 1 and 2, one row each
    assert writer.put_rows(
        "clf", 1, rule, [1, 2], None, [10.0, 10.25], 10.5, 1e9, _scores(2, 0), _inputs(2, 0)
    )
    # model batch 2: request 3 of two rows and a client-chosen id of one row
    assert writer.put_rows(
        "clf", 1, rule, [3, "client-1"], [2, 1], [11.0, 11.5], 12.0, 1e9 + 2, _scores(3, 1),
        _inputs(3, 2),
    )  # fmt: skip
    # model batch 3: its inputs not kept (sampled out): stored apart from the others
    assert writer.put_rows("clf", 1, rule, [4], None, [12.0], 12.5, 1e9 + 3, _scores(1, 2), None)
    # before the writer runs, the buffered rows answer lookups like any others
    assert writer.pending_versions("clf", ["srv-3/1", "client-1", "srv-4", "srv-3"]) == {
        "srv-3/1": 1,
        "client-1": 1,
        "srv-4": 1,
    }
    pending = writer.pending("clf", "srv-3/0")
    assert pending is not None and pending.latency_s == pytest.approx(1.0)
    assert writer.pending_ids("clf") == {
        "srv-1",
        "srv-2",
        "srv-3/0",
        "srv-3/1",
        "client-1",
        "srv-4",
    }
    writer.flush()
    assert [len(b) for b in written] == [5, 1]
    assert _ids(written) == ["srv-1", "srv-2", "srv-3/0", "srv-3/1", "client-1", "srv-4"]
    np.testing.assert_allclose(written[0].latency, [0.5, 0.25, 1.0, 1.0, 0.5])
    np.testing.assert_array_equal(written[0].inputs["input"], _inputs(5, 0)["input"])  # type: ignore[index]
    assert written[1].inputs is None
    observations = ObservationStore(engine)
    row = observations.get("clf", "srv-3/1")
    scores = _scores(3, 1)["output"]
    assert row is not None and row.at == datetime.fromtimestamp(1e9 + 2, UTC)
    assert row.prediction == int(scores[1].argmax())
    np.testing.assert_array_equal(row.inputs["input"], _inputs(1, 3)["input"])  # type: ignore[index]
    # the writer took the gathered rows: what comes next is stored as a new batch
    writer.put_rows("clf", 1, rule, [5], None, [13.0], 13.5, 1e9 + 4, _scores(1, 3), _inputs(1, 9))
    writer.flush()
    assert [len(b) for b in written] == [5, 1, 1]
    page = observations.observations("clf")
    assert [o.request_id for o in page.observations] == [
        "srv-1", "srv-2", "srv-3/0", "srv-3/1", "client-1", "srv-4", "srv-5",
    ]  # fmt: skip
    assert writer.written == 7 and writer.dropped == 0


def test_a_tap_lets_go_of_its_capture_once_the_writer_takes_it(
    engine: Engine, classifier: ModelVersion
) -> None:
    rule = RowRule(classifier.signature, trusted=True)
    writer = ObservationWriter(engine, id_prefix="srv")
    tap = writer.tap("clf", 1, rule)
    assert writer.tap("clf", 1, rule) is tap  # one per (model, version, rule)
    inputs = _inputs(1, 0)
    given = [weakref.ref(a) for a in inputs.values()]
    assert tap.put([1], None, [1.0], 2.0, 1e9, _scores(1, 0), inputs)
    del inputs
    assert all(r() is None for r in given)  # copied into the capture, not kept as given
    capture = writer._queue[0]
    assert isinstance(capture, Capture) and capture.inputs is not None
    held = [weakref.ref(a) for a in (*capture.outputs.values(), *capture.inputs.values())]
    del capture
    assert all(r() is not None for r in held)  # buffered
    writer.flush()
    # stored, and nothing keeps its arrays alive (a version that stops serving keeps its tap)
    assert all(r() is None for r in held)
    assert tap.put([2], None, [1.0], 2.0, 1e9, _scores(1, 1), _inputs(1, 1))
    writer.flush()
    assert [o.request_id for o in ObservationStore(engine).observations("clf").observations] == [
        "srv-1", "srv-2",
    ]  # fmt: skip


def test_a_tap_copies_batches_into_buffers_sized_from_the_last_flush(
    engine: Engine, classifier: ModelVersion, caplog: pytest.LogCaptureFixture
) -> None:
    rule = RowRule(classifier.signature, trusted=True)
    writer = ObservationWriter(engine, id_prefix="srv")
    tap = writer.tap("clf", 1, rule)

    def open_capture() -> Capture:
        capture = tap._captures[True]
        assert capture is not None
        return capture

    for n in range(50):  # 100 rows: the first capture's buffers (1024 rows) hold them
        assert tap.put(
            [2 * n, 2 * n + 1], None, [1.0, 1.0], 2.0, 1e9, _scores(2, n), _inputs(2, 2 * n)
        )
    assert open_capture().outputs["output"].shape == (1024, 3)
    writer.flush()
    stored = ObservationStore(engine).observations("clf", limit=1000).observations
    assert [o.request_id for o in stored] == [f"srv-{i}" for i in range(100)]
    np.testing.assert_array_equal(
        np.concatenate([o.inputs["input"] for o in stored if o.inputs is not None]),
        _inputs(100, 0)["input"],
    )
    # the next capture is made for the last one's rows and a quarter more
    assert tap.put([100], None, [1.0], 2.0, 1e9, _scores(1, 0), _inputs(1, 100))
    assert open_capture().outputs["output"].shape == (125, 3)
    # a batch whose arrays do not stack with the open capture's starts a new one
    wide = {"output": np.ones((1, 3), np.float64)}
    assert tap.put([101], None, [1.0], 2.0, 1e9, wide, _inputs(1, 101))
    assert open_capture().outputs["output"].dtype == np.float64 and writer.buffered == 2
    # a batch that cannot be taken at all leaves the buffer's counts as they were
    with pytest.raises(TypeError):
        tap.put([102], None, ["soon"], 2.0, 1e9, wide, _inputs(1, 102))  # type: ignore[list-item]
    assert writer.buffered == 2 and writer.buffered_bytes == 2 * 28
    with pytest.raises(ValueError):  # two requests, one row: no capture takes it
        tap.put([103, 104], None, [1.0, 1.0], 2.0, 1e9, wide, _inputs(1, 103))
    assert writer.buffered == 2
    with caplog.at_level(logging.WARNING, logger="torchops"):
        writer.flush()  # the capture opened for it stays empty and is not written
    assert not caplog.records and writer.dropped == 0
    stored = ObservationStore(engine).observations("clf", limit=1000).observations
    assert [o.request_id for o in stored][-2:] == ["srv-100", "srv-101"]
    assert stored[-1].outputs["output"].dtype == np.float64


def test_gathered_rows_respect_the_stored_batch_caps_and_the_buffer(
    engine: Engine, classifier: ModelVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = RowRule(classifier.signature, trusted=True)
    monkeypatch.setattr(capture_module, "MAX_STORED_ROWS", 4)  # read by Tap.put
    sizes: list[int] = []
    writer = ObservationWriter(
        engine, id_prefix="srv", max_buffer=7, on_write=lambda bs: sizes.extend(len(b) for b in bs)
    )
    for n in range(3):  # three model batches of two rows: the fourth row ends a stored batch
        ok = writer.put_rows(
            "clf", 1, rule, [2 * n, 2 * n + 1], None, [1.0, 1.0], 2.0, 1e9, _scores(2, n),
            _inputs(2, 2 * n),
        )  # fmt: skip
        assert ok
    # a fourth would make 8 rows buffered, more than max_buffer: dropped and counted
    assert not writer.put_rows(
        "clf", 1, rule, [6, 7], None, [1.0, 1.0], 2.0, 1e9, _scores(2, 3), _inputs(2, 6)
    )
    assert writer.dropped == 2 and writer.buffered == 6
    writer.flush()
    assert sizes == [4, 2]
    assert [o.request_id for o in ObservationStore(engine).observations("clf").observations] == [
        f"srv-{i}" for i in range(6)
    ]
    # a byte cap: 28 bytes a row (3 + 4 float32), at most 60 bytes per stored batch
    monkeypatch.setattr(capture_module, "MAX_STORED_BYTES", 60)
    sizes.clear()
    for n in range(3):
        writer.put_rows(
            "clf", 1, rule, [10 + n], None, [1.0], 2.0, 1e9, _scores(1, n), _inputs(1, n)
        )
    writer.flush()
    assert sizes == [2, 1]


def test_rows_of_an_untrusted_rule_are_checked_like_any_batch(
    engine: Engine, classifier: ModelVersion
) -> None:
    rule = RowRule(classifier.signature)  # not the server's: checked by the writer
    writer = ObservationWriter(engine, id_prefix="srv")
    assert writer.put_rows("clf", 1, rule, [1], None, [1.0], 2.0, 1e9, _scores(1, 0), _inputs(1, 0))
    assert writer.put_rows(
        "bad name!", 1, rule, [2], None, [1.0], 2.0, 1e9, _scores(1, 0), _inputs(1, 0)
    )
    writer.flush()
    assert writer.written == 1 and writer.dropped == 1
    assert ObservationStore(engine).get("clf", "srv-1") is not None


def test_the_buffer_is_bounded_by_bytes_as_well_as_rows(
    engine: Engine, classifier: ModelVersion
) -> None:
    rule = RowRule(classifier.signature, trusted=True)
    # 28 bytes a row (3 + 4 float32): three rows fit in 100 bytes, a fourth does not
    writer = ObservationWriter(engine, id_prefix="srv", max_buffer_bytes=100)
    ok = writer.put_rows(
        "clf", 1, rule, [0, 1, 2], None, [1.0] * 3, 2.0, 1e9, _scores(3, 0), _inputs(3, 0)
    )
    assert ok
    assert not writer.put_rows(
        "clf", 1, rule, [3], None, [1.0], 2.0, 1e9, _scores(1, 1), _inputs(1, 3)
    )
    late = ObservedBatch("clf", 1, [4], None, 1e9, [1.0], 2.0, _scores(1, 2), _inputs(1, 4), rule)
    assert not writer.put_batch(late)
    assert writer.dropped == 2 and writer.buffered == 3
    writer.flush()  # written: the bytes are free again
    assert writer.put_rows(
        "clf", 1, rule, [5, 6, 7], None, [1.0] * 3, 2.0, 1e9, _scores(3, 3), _inputs(3, 5)
    )
    writer.flush()
    assert writer.written == 6 and writer.dropped == 2
    with pytest.raises(InvalidInput, match="max_buffer_bytes"):
        ObservationWriter(engine, max_buffer_bytes=0)
