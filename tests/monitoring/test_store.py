from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, inspect, select, update

from torchops.errors import Conflict, InvalidInput
from torchops.monitoring import store
from torchops.packaging import decode_arrays
from torchops.registry import Registry
from torchops.registry import store as registry_store

TABLES = {
    "observation_batches",
    "observation_ids",
    "feedback",
    "snapshots",
    "alert_rules",
    "alert_events",
}


def _schema_version(engine: Engine) -> str | None:
    meta = registry_store.meta
    with engine.connect() as conn:
        value: str | None = conn.execute(
            select(meta.c.value).where(meta.c.key == "monitoring_schema_version")
        ).scalar()
        return value


def test_tables_are_created_beside_the_registrys_once(engine: Engine) -> None:
    store.ensure_tables(engine)
    store.ensure_tables(engine)
    names = set(inspect(engine).get_table_names())
    assert names >= TABLES | {"models", "versions", "meta"}
    indexes = {i["name"] for i in inspect(engine).get_indexes("observation_batches")}
    assert {
        "ix_observation_batches_model_version_id",
        "ix_observation_batches_model_prefix_lo",
        "ix_observation_batches_last_at",
    } <= indexes
    assert _schema_version(engine) == str(store.SCHEMA_VERSION)


_START_TOGETHER = """
import os, sys, time
from torchops.monitoring import store
from torchops.packaging import decode_arrays
from torchops.registry.store import connect

url, go, ready = sys.argv[1], sys.argv[2], sys.argv[3]
engine = connect(url)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
store.ensure_tables(engine)
"""


def test_processes_starting_at_once_create_the_tables_safely(
    database_url: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _START_TOGETHER, database_url, str(go), str(tmp_path / f"r{i}")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    while len(list(tmp_path.glob("r*"))) < 4 and all(p.poll() is None for p in processes):
        time.sleep(0.01)  # until all four wait for the signal
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, "\n".join(errors)
    engine = registry_store.connect(database_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        meta = registry_store.meta
        with engine.connect() as conn:
            rows = conn.execute(
                select(meta.c.value).where(meta.c.key == "monitoring_schema_version")
            ).all()
        assert len(rows) == 1
    finally:
        engine.dispose()


def test_a_newer_schema_is_refused(database_url: str, tmp_path: Path, registry: Registry) -> None:
    store.ensure_tables(registry.engine)
    meta = registry_store.meta
    with registry.engine.begin() as conn:
        conn.execute(
            update(meta).where(meta.c.key == "monitoring_schema_version").values(value="999")
        )
    with (
        Registry(tmp_path / "home", url=database_url) as again,
        pytest.raises(Conflict, match="999"),
    ):
        store.ensure_tables(again.engine)


def test_an_older_schema_gets_the_new_tables_and_version(
    database_url: str, tmp_path: Path, registry: Registry
) -> None:
    store.ensure_tables(registry.engine)
    meta = registry_store.meta
    with registry.engine.begin() as conn:
        conn.execute(
            update(meta).where(meta.c.key == "monitoring_schema_version").values(value="1")
        )
    with Registry(tmp_path / "home", url=database_url) as again:
        store.ensure_tables(again.engine)
        assert _schema_version(again.engine) == str(store.SCHEMA_VERSION)
        assert {"observation_batches", "observation_ids"} <= set(
            inspect(again.engine).get_table_names()
        )


def test_jsonable_unwraps_numpy_and_nulls_non_finite_numbers() -> None:
    value = {"a": np.int64(3), "b": [np.float32(0.5), float("inf")], 1: (True, None, "s")}
    assert store.jsonable(value) == {"a": 3, "b": [0.5, None], "1": [True, None, "s"]}
    assert store.jsonable(np.array([[1.0, np.nan]])) == [[1.0, None]]
    with pytest.raises(TypeError):
        store.jsonable({"x": object()})


@pytest.mark.parametrize(
    "dtype",
    [
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    ],
)
def test_array_encoder_round_trips_through_safetensors(dtype: str) -> None:
    encoder = store.ArrayEncoder()
    rng = np.random.default_rng(0)
    arrays = {
        "z": (rng.random((3, 5)) * 100).astype(dtype),
        "a": (rng.random((2, 3, 4)) * 100).astype(dtype)[:, ::2, ::-1],  # not contiguous
        "empty": np.zeros((0, 4), dtype=dtype),
        "scalar": np.array(7, dtype=dtype),
    }
    for _ in range(2):  # the second time from the cached header
        decoded = decode_arrays(encoder.encode(arrays))
        assert decoded.keys() == arrays.keys()
        for name, array in arrays.items():
            assert decoded[name].dtype == array.dtype
            np.testing.assert_array_equal(decoded[name], array)
    # the same bytes the safetensors library itself would decode, layout for layout
    assert decode_arrays(encoder.encode({"x": arrays["z"]}))["x"].shape == (3, 5)


def test_array_encoder_falls_back_for_other_byte_orders_and_types() -> None:
    encoder = store.ArrayEncoder()
    big_endian = np.arange(4, dtype=">f4")
    decoded = decode_arrays(encoder.encode({"x": big_endian}))
    np.testing.assert_array_equal(decoded["x"], big_endian)
    assert decode_arrays(encoder.encode({"y": [1.0, 2.0]}))["y"].tolist() == [1.0, 2.0]  # type: ignore[dict-item]
    with pytest.raises(InvalidInput):
        encoder.encode({"s": np.array(["text"])})


def test_array_encoder_keeps_layouts_apart_that_differ_only_in_byte_order() -> None:
    encoder = store.ArrayEncoder()
    little = np.arange(4, dtype="<f4")
    big = np.arange(4, dtype=">f4")
    for arrays in ({"x": little}, {"x": big}, {"x": little}):  # one layout cached, then not
        decoded = decode_arrays(encoder.encode(arrays))["x"]
        np.testing.assert_array_equal(decoded, np.arange(4))
    as_float64 = decode_arrays(encoder.encode({"x": little.astype("<f8")}))["x"]
    assert as_float64.dtype == np.float64 and as_float64.tolist() == [0.0, 1.0, 2.0, 3.0]
