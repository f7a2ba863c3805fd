"""Observation arrays in segment files beside a SQLite database (``monitoring._segments``)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, inspect, select, text, update

from torchops.errors import ArtifactCorrupted
from torchops.monitoring import _segments, segment_dir, store
from torchops.monitoring.observations import ObservationStore, ObservationWriter
from torchops.registry import Registry
from torchops.registry import store as registry_store

from .conftest import MakeObservation


def _put(writer: ObservationWriter, make: MakeObservation, ids: range) -> None:
    for i in ids:
        inputs = {"input": np.full((1, 4), i, dtype=np.float32) + np.arange(4, dtype=np.float32)}
        assert writer.put(make("clf", f"r{i}", inputs=inputs))
    writer.flush()


@pytest.fixture
def rotating(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers move to a new segment at every flush."""
    monkeypatch.setattr(_segments, "ROTATE_BYTES", 1)


def _three_flushes(engine: Engine, make: MakeObservation) -> tuple[ObservationWriter, list[str]]:
    """A writer that stored r0..r29 in three flushes; the segment of each stored batch."""
    writer = ObservationWriter(engine)
    for start in (0, 10, 20):
        _put(writer, make, range(start, start + 10))
    return writer, [str(row["segment"]) for row in _stored(engine)]


def _stored(engine: Engine) -> list[dict[str, object]]:
    b = store.observation_batches
    with engine.connect() as conn:
        rows = conn.execute(
            select(b.c.id, b.c.outputs, b.c.inputs, b.c.segment, b.c.inputs_size).order_by(b.c.id)
        )
        return [dict(row._mapping) for row in rows]


def _segments_table(engine: Engine) -> dict[str, bool]:
    s = store.observation_segments
    with engine.connect() as conn:
        return {name: bool(sealed) for name, sealed in conn.execute(select(s.c.name, s.c.sealed))}


def _check_read_back(engine: Engine, ids: range) -> None:
    reader = ObservationStore(engine)
    for i in ids:
        found = reader.get("clf", f"r{i}")
        assert found is not None and found.inputs is not None
        expected = np.full((1, 4), i, dtype=np.float32) + np.arange(4, dtype=np.float32)
        np.testing.assert_array_equal(found.inputs["input"], expected)
        seed = sum(f"r{i}".encode())
        np.testing.assert_array_equal(found.outputs["output"], np.full((1, 3), seed % 7))


def test_arrays_go_to_a_segment_beside_sqlite_and_stay_inline_on_postgresql(
    database_url: str, engine: Engine, make_observation: MakeObservation, tmp_path: Path
) -> None:
    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(30))
    rows = _stored(engine)
    assert len(rows) == 1
    if database_url.startswith("sqlite"):
        (row,) = rows
        assert row["outputs"] == b"" and row["inputs"] is None and row["inputs_size"] > 0
        path = tmp_path / "observations" / str(row["segment"])
        assert path.read_bytes().startswith(_segments.MAGIC)
        assert _segments_table(engine) == {row["segment"]: False}  # open until close
    else:
        assert rows[0]["segment"] is None and len(rows[0]["outputs"]) > 0
        assert not (tmp_path / "observations").exists()
    _check_read_back(engine, range(30))
    writer.close()
    assert all(_segments_table(engine).values())
    with Registry(tmp_path / "home", url=database_url) as again:  # another process's view
        _check_read_back(again.engine, range(30))


def test_segments_go_beside_a_sqlite_file_only(tmp_path: Path) -> None:
    def where(url: str) -> Path | None:
        engine = create_engine(url)
        try:
            return segment_dir(engine)
        finally:
            engine.dispose()

    assert where(f"sqlite:///{tmp_path / 'db' / 'r.db'}") == tmp_path / "db" / "observations"
    assert where("sqlite://") is None and where("sqlite:///:memory:") is None
    assert where("postgresql+psycopg://u@localhost/d") is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("rotating")
def test_the_writer_moves_to_a_new_segment_and_seals_the_old(
    engine: Engine, make_observation: MakeObservation
) -> None:
    writer, names = _three_flushes(engine, make_observation)
    assert len(set(names)) == 3
    assert _segments_table(engine) == {names[0]: True, names[1]: True, names[2]: False}
    _check_read_back(engine, range(30))
    writer.close()
    assert _segments_table(engine) == dict.fromkeys(names, True)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("rotating")
def test_retention_deletes_the_segments_no_batch_points_at(
    engine: Engine,
    make_observation: MakeObservation,
    tmp_path: Path,
) -> None:
    writer, names = _three_flushes(engine, make_observation)
    directory = tmp_path / "observations"
    reader = ObservationStore(engine)
    assert reader.apply_retention(max_rows=15) == 15
    # the first batch is deleted, the second rewritten (inline) with its newest 5 rows: no
    # batch points at the two sealed segments any more; the open one stays with its writer
    assert [row["segment"] for row in _stored(engine)] == [None, names[2]]
    assert sorted(p.name for p in directory.glob("*.seg")) == [names[2]]
    assert _segments_table(engine) == {names[2]: False}
    _check_read_back(engine, range(15, 30))
    assert reader.get("clf", "r14") is None
    writer.close()
    assert reader.apply_retention(max_rows=0) == 15
    assert list(directory.glob("*.seg")) == [] and _segments_table(engine) == {}


_DIE_WHILE_WRITING = """
import os, sys
import numpy as np
from torchops.monitoring.observations import Observation, ObservationWriter
from torchops.registry.store import connect, utcnow

writer = ObservationWriter(connect(sys.argv[1]))
for flush in range(3):
    for i in range(flush * 10, flush * 10 + 10):
        inputs = {"input": np.full((1, 4), i, dtype=np.float32) + np.arange(4, dtype=np.float32)}
        outputs = {"output": np.full((1, 3), sum(f"r{i}".encode()) % 7, dtype=np.float32)}
        writer.put(Observation(f"r{i}", "clf", 1, utcnow(), 0.001, outputs, inputs, 0, None))
    writer.flush()
os._exit(0)  # no close: the segment is never sealed
"""


def _die_while_writing(database_url: str) -> None:
    """Run a writer process that stores 30 observations in 3 batches and dies."""
    done = subprocess.run(
        [sys.executable, "-c", _DIE_WHILE_WRITING, database_url], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_dead_writers_segment_is_recovered_without_the_batches_it_lost(
    database_url: str,
    engine: Engine,
    make_observation: MakeObservation,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _die_while_writing(database_url)
    rows = _stored(engine)
    assert len(rows) == 3 and len({row["segment"] for row in rows}) == 1
    (name,) = _segments_table(engine)
    assert _segments_table(engine) == {name: False}
    path = tmp_path / "observations" / str(name)
    b = store.observation_batches
    with engine.connect() as conn:
        second = conn.execute(
            select(b.c.segment_offset, b.c.outputs_size).where(b.c.id == rows[1]["id"])
        ).one()
    # as after a power loss: the last batch's bytes never reached the disk, and one byte
    # of the second batch's outputs did not either
    data = bytearray(path.read_bytes())
    data[int(second.segment_offset) + 2] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) - 10]))

    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(100, 105))  # its first segment recovers the dead one
    assert [row["id"] for row in _stored(engine)][:1] == [rows[0]["id"]]
    assert len(_stored(engine)) == 2
    assert _segments_table(engine)[name] is True
    assert "2 stored batches lost their bytes" in caplog.text
    _check_read_back(engine, range(10))
    _check_read_back(engine, range(100, 105))
    reader = ObservationStore(engine)
    assert reader.get("clf", "r15") is None and reader.get("clf", "r25") is None
    writer.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("rotating")
def test_a_live_writer_recovers_a_dead_writers_segment_when_it_moves_to_a_new_one(
    database_url: str,
    engine: Engine,
    make_observation: MakeObservation,
) -> None:
    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(100, 105))
    _die_while_writing(database_url)
    assert sorted(_segments_table(engine).values()) == [False, False]  # the live and the dead
    _put(writer, make_observation, range(105, 110))  # a new segment: the dead one is sealed
    assert sorted(_segments_table(engine).values()) == [False, True, True]
    _check_read_back(engine, range(30))
    writer.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_dead_writers_missing_segment_takes_its_batches_with_it(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    _die_while_writing(database_url)
    (name,) = _segments_table(engine)
    (tmp_path / "observations" / name).unlink()
    reader = ObservationStore(engine)
    assert reader.count("clf") == 30
    reader.apply_retention()  # recovers dead writers' segments first
    assert reader.count("clf") == 0 and _segments_table(engine) == {}
    assert reader.get("clf", "r3") is None


def _unlisted(directory: Path, name: str, *, old: bool = True) -> Path:
    """A segment file nothing lists, as a writer that died before listing it leaves one."""
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.seg"
    path.write_bytes(_segments.MAGIC)
    if old:
        then = time.time() - _segments.UNLISTED_AGE_S - 60
        os.utime(path, (then, then))
    return path


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_retention_deletes_old_unlisted_segments_that_no_writer_holds(
    engine: Engine, make_observation: MakeObservation, tmp_path: Path
) -> None:
    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(10))
    directory = tmp_path / "observations"
    (open_segment,) = _segments_table(engine)
    dead = _unlisted(directory, "dead")
    fresh = _unlisted(directory, "fresh", old=False)
    locked = _unlisted(directory, "locked")
    with locked.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live writer's, not listed yet
        ObservationStore(engine).apply_retention()
    assert not dead.exists()
    assert fresh.exists() and locked.exists() and (directory / open_segment).exists()
    _check_read_back(engine, range(10))
    writer.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_writer_opening_a_segment_deletes_a_dead_writers_unlisted_file(
    engine: Engine, make_observation: MakeObservation, tmp_path: Path
) -> None:
    dead = _unlisted(tmp_path / "observations", "dead")
    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(10))
    assert not dead.exists()
    _check_read_back(engine, range(10))
    writer.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_missing_or_damaged_segment_is_a_clear_error(
    engine: Engine, make_observation: MakeObservation, tmp_path: Path
) -> None:
    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(10))
    writer.close()
    (row,) = _stored(engine)
    path = tmp_path / "observations" / str(row["segment"])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ArtifactCorrupted, match="missing or damaged"):
        ObservationStore(engine).get("clf", "r3")
    path.unlink()
    with pytest.raises(ArtifactCorrupted, match=f"{path}.*missing"):
        ObservationStore(engine).get("clf", "r3")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_arrays_stay_inline_when_no_segment_can_be_opened(
    engine: Engine, make_observation: MakeObservation, tmp_path: Path
) -> None:
    (tmp_path / "observations").write_text("not a directory")
    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(10))
    writer.close()
    assert writer.written == 10 and writer.dropped == 0
    assert [row["segment"] for row in _stored(engine)] == [None]
    _check_read_back(engine, range(10))


def test_an_older_schema_gets_the_segment_columns(
    database_url: str, tmp_path: Path, registry: Registry, make_observation: MakeObservation
) -> None:
    engine = registry.engine
    store.ensure_tables(engine)
    blocker = tmp_path / "observations"
    sqlite = database_url.startswith("sqlite")
    if sqlite:
        blocker.write_text("not a directory")  # so the batch is stored inline, as in schema 2
    writer = ObservationWriter(engine)
    _put(writer, make_observation, range(10))
    writer.close()
    blocker.unlink(missing_ok=True)
    meta = registry_store.meta
    with engine.begin() as conn:  # back to schema 2's tables
        conn.execute(text("DROP INDEX ix_observation_batches_segment"))
        for column in ("segment", "segment_offset", "outputs_size", "inputs_size"):
            conn.execute(text(f"ALTER TABLE observation_batches DROP COLUMN {column}"))
        conn.execute(text("DROP TABLE observation_segments"))
        conn.execute(
            update(meta).where(meta.c.key == "monitoring_schema_version").values(value="2")
        )
    with Registry(tmp_path / "home", url=database_url) as again:
        store.ensure_tables(again.engine)
        columns = {c["name"] for c in inspect(again.engine).get_columns("observation_batches")}
        assert {"segment", "segment_offset", "outputs_size", "inputs_size"} <= columns
        indexes = {i["name"] for i in inspect(again.engine).get_indexes("observation_batches")}
        assert "ix_observation_batches_segment" in indexes
        writer = ObservationWriter(again.engine)
        _put(writer, make_observation, range(10, 20))
        writer.close()
        segments = [row["segment"] for row in _stored(again.engine)]
        assert segments[0] is None and (segments[1] is not None) == sqlite
        _check_read_back(again.engine, range(20))  # the old inline batch and the new one
