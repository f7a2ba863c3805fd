"""Observation writer benchmark: CPU per stored observation, against a plain SQLite blob.

Usage: python bench/observations.py [--flushes N] [--requests-per-flush N] [--rows N]
                                    [--input-values N] [--classes N]

Server batches (``--rows`` requests, one row each, generated ids, ``--input-values``
float32 inputs and ``--classes`` float32 scores per row) are put into a writer on a fresh
SQLite database (WAL) through a ``Tap``, as the server's observer does, and flushed
``--requests-per-flush`` at a time, as the server's writer thread would. It prints CPU µs
(user + system, this process) per observation for:

1. ``Tap.put`` — what the batcher's thread pays, per batch and per row;
2. the writer's flush — the columns, stacking the arrays into safetensors bytes, the
   insert, and appending the arrays' bytes to the segment file;
3. the baseline: the same number of bytes (the row's and the segment's) inserted as one
   plain blob per flush with sqlite3 on another fresh database (same page size and
   journal), in the same run — storing the bytes in SQLite and nothing else.

The disk cache is synced before each part, so none pays for another's writeback.

Ratio 2 / 3 compares the writer with storing the bytes as one SQLite blob. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from torchops.monitoring import store
from torchops.monitoring._record import RowRule
from torchops.monitoring.observations import ObservationWriter, ObservedBatch
from torchops.registry.store import PAGE_SIZE, connect
from torchops.types import Signature, TensorSpec


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def batches(args: argparse.Namespace, rule: RowRule) -> list[list[ObservedBatch]]:
    rng = np.random.default_rng(0)
    flushes, number = [], 0
    for _ in range(args.flushes):
        flush = []
        for _ in range(args.requests_per_flush):
            now = time.monotonic()
            flush.append(
                ObservedBatch(
                    "bench", 1, list(range(number, number + args.rows)), None, time.time(),
                    [now] * args.rows, now + 0.001,
                    {"output": rng.standard_normal((args.rows, args.classes), np.float32)},
                    {"x": rng.standard_normal((args.rows, args.input_values), np.float32)},
                    rule,
                )
            )  # fmt: skip
            number += args.rows
        flushes.append(flush)
    return flushes


def baseline(path: Path, sizes: list[int]) -> float:
    """CPU seconds to insert blobs of ``sizes`` bytes, one per transaction, with sqlite3."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # as the registry's database has
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")
    blobs = [os.urandom(size) for size in sizes]
    start = cpu()
    for blob in blobs:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (data) VALUES (?)", (blob,))
        conn.execute("COMMIT")
    seconds = cpu() - start
    conn.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flushes", type=int, default=40)
    parser.add_argument("--requests-per-flush", type=int, default=240)
    parser.add_argument("--rows", type=int, default=25, help="requests per server batch")
    parser.add_argument("--input-values", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    signature = Signature(
        inputs=(TensorSpec("x", "float32", (-1, args.input_values)),),
        outputs=(TensorSpec("output", "float32", (-1, args.classes)),),
        task="classification",
    )
    rule = RowRule(signature, trusted=True)  # as the server's monitor makes it
    flushes = batches(args, rule)
    rows = sum(b.size for flush in flushes for b in flush)
    with tempfile.TemporaryDirectory(prefix="torchops-bench-observations-") as home:
        os.sync()
        engine = connect(f"sqlite:///{home}/registry.db")
        writer = ObservationWriter(engine, id_prefix="bench", max_buffer=10**9)
        tap = writer.tap("bench", 1, rule)
        put = flush_time = 0.0
        for flush in flushes:
            start = cpu()
            for batch in flush:
                tap.put(
                    batch.request_ids, batch.rows, batch.started, batch.done, batch.at,
                    batch.outputs, batch.inputs,
                )  # fmt: skip
            put += cpu() - start
            start = cpu()
            writer.flush()
            flush_time += cpu() - start
        b = store.observation_batches
        columns = (b.c.ids, b.c.columns, b.c.outputs, b.c.inputs, b.c.outputs_size,
                   b.c.inputs_size)  # fmt: skip
        with engine.connect() as conn:
            # inline bytes, and the bytes in the segment file (sizes; None when inline)
            stored_sizes = [
                sum(len(v or b"") for v in row[:4]) + sum(v or 0 for v in row[4:])
                for row in conn.execute(b.select().with_only_columns(*columns))
            ]
        engine.dispose()
        os.sync()
        base = baseline(Path(home) / "baseline.db", stored_sizes)
    per_row = 1e6 / rows
    print(f"{rows:,} observations in {len(flushes)} flushes of {args.requests_per_flush} "
          f"server batches of {args.rows} rows; {sum(stored_sizes) / rows:.0f} bytes stored "
          f"per observation")  # fmt: skip
    print(f"Tap.put (batcher):        {put * per_row:.3f} us/row "
          f"({put * 1e6 / (rows / args.rows):.2f} us per server batch)")  # fmt: skip
    print(f"writer flush:             {flush_time * per_row:.3f} us/row")
    print(f"baseline (sqlite3 blob):  {base * per_row:.3f} us/row")
    print(f"writer / baseline:        {flush_time / base:.2f}x")


if __name__ == "__main__":
    main()
