"""Real processes against one registry: no lost or duplicated versions, no partial ones."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

from torchops.errors import NotFound
from torchops.registry import Registry, store
from torchops.registry.registry import LEASE_TIMEOUT

from .helpers import register_forever, register_many, snapshot, tiny_package

WORKERS = 2
PER_WORKER = 6


def test_processes_registering_at_once_get_consecutive_numbers(
    registry: Registry, database_url: str
) -> None:
    home = str(registry.settings.home)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=register_many, args=(home, database_url, w, PER_WORKER, start))
        for w in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * WORKERS

    versions = registry.versions("racer")
    assert [v.version for v in versions] == list(range(1, WORKERS * PER_WORKER + 1))
    seen = sorted((int(v.tags["worker"]), int(v.tags["i"])) for v in versions)
    assert seen == [(w, i) for w in range(WORKERS) for i in range(PER_WORKER)]
    for version in versions:
        expected = tiny_package(1000 * int(version.tags["worker"]) + int(version.tags["i"]))
        assert (
            registry.read_artifact(f"racer:{version.version}", "weights")
            == (expected.blobs["weights"])
        )
        assert version.details["registered_by"] == f"w{version.tags['worker']}"
    assert registry.get_model("racer").latest_version == WORKERS * PER_WORKER


def test_a_killed_registration_leaves_no_partial_version(
    registry: Registry, database_url: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=register_forever, args=(str(registry.settings.home), database_url))
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while len(_versions(registry)) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    versions = registry.versions("crashy")
    assert len(versions) >= 20
    # every visible version is complete and intact
    for version in versions:
        expected = {"torchscript", "weights", "example", "reference", "profile"}
        assert set(version.artifacts) == expected
        for kind in version.artifacts:
            registry.read_artifact(f"crashy:{version.version}", kind)
    # the dead writer may have left blobs, a lease and a temporary file; an hour later
    # (simulated by back-dating them) gc removes all of it and nothing referenced
    an_hour_ago = store.utcnow() - LEASE_TIMEOUT - timedelta(minutes=1)
    with registry._write() as conn:
        conn.execute(store.uploads.update().values(created_at=an_hour_ago))
    tmp = Path(registry._blobs._join("tmp"))
    for leftover in tmp.iterdir():
        os.utime(leftover, (an_hour_ago.timestamp(), an_hour_ago.timestamp()))
    registry.gc()
    counts, blobs = snapshot(registry)
    assert set(blobs) == {a.sha256 for v in versions for a in v.artifacts.values()}
    assert counts["uploads"] == 0
    assert list(tmp.iterdir()) == []
    assert registry.versions("crashy") == versions


def _versions(registry: Registry) -> list[int]:
    try:
        return [v.version for v in registry.versions("crashy")]
    except NotFound:
        return []
