"""Observation writer benchmark: the cost of ``put`` and the writer's sustained rows/s.

Usage: python bench/observations.py [--rows N] [--batch-size N] [--input-values N]

1. ``put`` on the request path: mean and p99 µs per call, with the writer thread idle and
   with it busy writing (it competes for the GIL), against a bare ``deque.append`` of the
   same objects (the floor).
2. Sustained rows/s: N observations (3 float outputs, ``--input-values`` float inputs,
   a class index and probabilities) put as fast as possible into a writer on a fresh
   SQLite database (WAL), timed until ``flush`` returns — encoding included — against a
   plain multi-row insert of the same rows already encoded (the database's own ceiling),
   and against the writer's previous path (SQLAlchemy multi-row insert with RETURNING and
   its JSON type) in the same run.

Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from torchops.monitoring import store
from torchops.monitoring.observations import Observation, ObservationWriter
from torchops.packaging import encode_arrays
from torchops.registry.store import connect, utcnow


class SqlAlchemyWriter(ObservationWriter):
    """The writer as it was: one SQLAlchemy multi-row insert with RETURNING per batch."""

    def _row(self, obs: Observation) -> tuple[Any, ...]:
        row = super()._row(obs)
        return (
            *row[:3],
            obs.at,
            *row[4:7],
            store.jsonable(obs.prediction),
            store.jsonable(obs.proba),
        )

    def _insert(self, rows: list[tuple[Any, ...]]) -> list[bool] | None:
        insert = store.insert_ignoring_duplicates(
            self.engine.dialect.name, store.observations
        ).returning(store.observations.c.request_id)
        params = [dict(zip(store.RAW_INSERT_COLUMNS, row, strict=True)) for row in rows]
        with store.writer(self.engine).begin() as conn:
            inserted = {r[0] for r in conn.execute(insert, params)}
        return None if len(inserted) == len(rows) else [r[2] in inserted for r in rows]


def writer_rate(
    cls: type[ObservationWriter], url: str, items: list[Observation], batch_size: int
) -> tuple[float, float, float]:
    """Rows/s put-to-flushed, seconds the puts took, seconds until flushed."""
    engine = connect(url)
    writer = cls(engine, max_buffer=len(items) + 1, batch_size=batch_size)
    writer.start()
    start = time.perf_counter()
    for obs in items:
        writer.put(obs)
    put_done = time.perf_counter() - start
    writer.flush()
    elapsed = time.perf_counter() - start
    writer.close()
    engine.dispose()
    assert writer.written == len(items), (writer.written, writer.dropped)
    return len(items) / elapsed, put_done, elapsed


def drain_cpu(
    cls: type[ObservationWriter], url: str, items: list[Observation], batch_size: int
) -> float:
    """CPU µs per row of the writer's work alone: buffer everything, then drain it on this
    thread (``close`` without a writer thread); immune to other load on the machine."""
    engine = connect(url)
    writer = cls(engine, max_buffer=len(items) + 1, batch_size=batch_size)
    for obs in items:
        writer.put(obs)
    start = time.process_time()
    writer.close()
    cpu = time.process_time() - start
    engine.dispose()
    assert writer.written == len(items), (writer.written, writer.dropped)
    return cpu / len(items) * 1e6


def observations(n: int, input_values: int) -> list[Observation]:
    rng = np.random.default_rng(0)
    at = utcnow()
    result = []
    for i in range(n):
        out = rng.random((1, 3), dtype=np.float32)
        result.append(
            Observation(
                request_id=f"req-{i}",
                model="bench",
                version=1,
                at=at,
                latency_s=0.0012,
                outputs={"output": out},
                inputs={"input": rng.random((1, input_values), dtype=np.float32)},
                prediction=int(out.argmax()),
                proba=[float(p) for p in out[0]],
            )
        )
    return result


def put_cost(writer: ObservationWriter, items: list[Observation]) -> tuple[float, float, float]:
    """Median, p99 and max of ``put`` in µs (per-call timer overhead subtracted)."""
    clock = time.perf_counter_ns
    overhead = min(-(clock() - clock()) for _ in range(1000))
    samples = []
    put = writer.put
    for obs in items:
        start = clock()
        put(obs)
        samples.append(clock() - start - overhead)
    samples.sort()
    return (
        statistics.median(samples) / 1000,
        samples[int(len(samples) * 0.99)] / 1000,
        samples[-1] / 1000,
    )


def bulk_put_mean(put: object, items: list[Observation]) -> float:
    """Mean µs per call over a tight loop (no per-call timer)."""
    call = put  # a bound method
    start = time.perf_counter()
    for obs in items:
        call(obs)  # type: ignore[operator]
    return (time.perf_counter() - start) / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--input-values", type=int, default=64)
    args = parser.parse_args()
    items = observations(args.rows, args.input_values)

    with tempfile.TemporaryDirectory() as tmp:
        # -- put on the request path ----------------------------------------------------
        engine = connect(f"sqlite:///{Path(tmp) / 'put.db'}")
        floor = deque()  # type: ignore[var-annotated]
        floor_us = bulk_put_mean(floor.append, items)
        idle = ObservationWriter(engine, max_buffer=len(items) + 1)
        idle_us = bulk_put_mean(idle.put, items)
        idle2 = ObservationWriter(engine, max_buffer=len(items) + 1)
        idle_p50, idle_p99, idle_max = put_cost(idle2, items)
        busy = ObservationWriter(engine, max_buffer=len(items) + 1, batch_size=args.batch_size)
        busy.start()
        busy_p50, busy_p99, busy_max = put_cost(busy, items)
        busy.close()
        full = ObservationWriter(engine, max_buffer=1)
        full_us = bulk_put_mean(full.put, items)
        print(f"put(), {len(items)} calls")
        print(f"  deque.append (floor)        {floor_us:7.3f} µs/call")
        ratio = idle_us / floor_us
        print(f"  put, writer idle            {idle_us:7.3f} µs/call  ({ratio:.1f}x floor)")
        print(
            f"  put, timed one by one       p50 {idle_p50:.3f} µs, p99 {idle_p99:.3f} µs, "
            f"max {idle_max:.1f} µs"
        )
        print(
            f"  put, writer busy writing    p50 {busy_p50:.3f} µs, p99 {busy_p99:.3f} µs, "
            f"max {busy_max:.1f} µs (max: waits for the GIL)"
        )
        print(f"  put, buffer full (drop)     {full_us:7.3f} µs/call")
        engine.dispose()

        # -- sustained writing ------------------------------------------------------------
        old_cpu = drain_cpu(
            SqlAlchemyWriter, f"sqlite:///{Path(tmp) / 'old-cpu.db'}", items, args.batch_size
        )
        new_cpu = drain_cpu(
            ObservationWriter, f"sqlite:///{Path(tmp) / 'cpu.db'}", items, args.batch_size
        )
        old_rate, _, _ = writer_rate(
            SqlAlchemyWriter, f"sqlite:///{Path(tmp) / 'old.db'}", items, args.batch_size
        )
        rate, put_done, elapsed = writer_rate(
            ObservationWriter, f"sqlite:///{Path(tmp) / 'rows.db'}", items, args.batch_size
        )

        raw_engine = connect(f"sqlite:///{Path(tmp) / 'raw.db'}")
        store.ensure_tables(raw_engine)
        rows = [
            {
                "model": o.model,
                "version": o.version,
                "request_id": o.request_id,
                "at": o.at,
                "latency_s": o.latency_s,
                "outputs": encode_arrays(o.outputs),
                "inputs": encode_arrays(o.inputs or {}),
                "prediction": o.prediction,
                "proba": o.proba,
            }
            for o in items
        ]
        start = time.perf_counter()
        for first in range(0, len(rows), args.batch_size):
            with store.writer(raw_engine).begin() as conn:
                conn.execute(store.observations.insert(), rows[first : first + args.batch_size])
        raw_rate = len(rows) / (time.perf_counter() - start)
        raw_engine.dispose()

    print(f"writer, SQLite WAL, batch {args.batch_size}, {args.input_values} input values/row")
    print(f"  puts took {put_done:.2f} s; written and flushed in {elapsed:.2f} s")
    print(f"  writer (encode + insert)    {rate:9.0f} rows/s")
    print(f"  previous writer (SQLAlchemy){old_rate:9.0f} rows/s  ({rate / old_rate:.2f}x)")
    print(f"  writer CPU, drained inline  {new_cpu:9.1f} µs/row")
    print(f"  previous writer CPU         {old_cpu:9.1f} µs/row  ({old_cpu / new_cpu:.2f}x)")
    print(f"  raw insert, pre-encoded     {raw_rate:9.0f} rows/s")
    print(f"  ratio writer / raw insert   {rate / raw_rate:9.2f}")


if __name__ == "__main__":
    main()
