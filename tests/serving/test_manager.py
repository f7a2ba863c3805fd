"""ModelManager against a real registry: routes, hot swaps, refs, on-demand versions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from torchops.errors import InvalidRef, NotFound, Unavailable
from torchops.registry import Registry
from torchops.serving.manager import ModelManager

pytestmark = pytest.mark.anyio

X = np.ones((1, 4), dtype=np.float32)

Managed = Callable[..., AbstractAsyncContextManager[tuple[ModelManager, Registry]]]


@pytest.fixture
def managed() -> Managed:
    @asynccontextmanager
    async def running(home: Path, **options: Any) -> AsyncIterator[tuple[ModelManager, Registry]]:
        registry = Registry(home)
        options.setdefault("poll_interval_s", 3600.0)
        manager = ModelManager(registry, **options)
        try:
            await manager.start()
            yield manager, registry
        finally:
            await manager.close()
            registry.close()

    return running


async def predict(manager: ModelManager, name: str) -> tuple[int, float]:
    served = manager.route(name)
    out = await served.batcher.submit({"x": X})
    return served.version, float(out["output"][0, 0])


async def test_serves_every_production_alias(managed: Managed, models_home: Path) -> None:
    async with managed(models_home) as (manager, _):
        assert sorted(manager.routes) == ["clf", "double", "fragile", "slow"]
        assert manager.ready
        assert await predict(manager, "double") == (1, 2.0)
        with pytest.raises(NotFound, match="plain"):
            manager.route("plain")


async def test_alias_move_swaps_and_unloads_the_old_version(managed: Managed, home: Path) -> None:
    async with managed(home) as (manager, registry):
        old = manager.route("double")
        registry.set_alias("double", "production", 2)
        await manager.sync()
        assert await predict(manager, "double") == (2, 3.0)
        assert old.retired
        await asyncio.gather(*manager._retiring)
        assert manager.served_versions("double") == [2]
        text = manager.metrics.render()[0].decode()
        assert 'torchops_loaded_versions{model="double",version="1"} 0.0' in text
        assert 'torchops_loaded_versions{model="double",version="2"} 1.0' in text
        with pytest.raises(Unavailable):
            await old.batcher.submit({"x": X})


async def test_requests_in_flight_finish_on_the_old_version(managed: Managed, home: Path) -> None:
    """A request queued on version 1 when the alias moves is answered by version 1."""
    with Registry(home) as registry:
        registry.set_alias("double", "production", 1)
    async with managed(home, max_batch_size=1) as (manager, registry):
        old = manager.route("double")
        # many requests queue on v1; the switch happens while they wait
        queued = [asyncio.ensure_future(old.batcher.submit({"x": X})) for _ in range(50)]
        await asyncio.sleep(0)
        registry.set_alias("double", "production", 2)
        await manager.sync()
        results = await asyncio.gather(*queued)
        assert all(float(r["output"][0, 0]) == 2.0 for r in results)
        assert await predict(manager, "double") == (2, 3.0)


async def test_polling_follows_the_alias(managed: Managed, home: Path) -> None:
    async with managed(home, poll_interval_s=0.05) as (manager, registry):
        registry.set_alias("double", "production", 2)
        for _ in range(400):
            if manager.route("double").version == 2:
                break
            await asyncio.sleep(0.025)
        assert manager.route("double").version == 2


async def test_removed_alias_stops_serving(managed: Managed, home: Path) -> None:
    async with managed(home) as (manager, registry):
        registry.remove_alias("clf", "production")
        await manager.sync()
        with pytest.raises(NotFound):
            manager.route("clf")


async def test_refs_pin_versions_and_follow_other_aliases(managed: Managed, home: Path) -> None:
    with Registry(home) as registry:
        registry.set_alias("double", "staging", 2)
    async with managed(home, refs=["double@staging", "plain", "clf:1"]) as (manager, registry):
        assert sorted(manager.routes) == ["clf", "double", "plain"]
        assert await predict(manager, "double") == (2, 3.0)
        assert await predict(manager, "plain") == (1, 5.0)  # no alias: latest
        registry.set_alias("double", "production", 2)  # production is not followed here
        registry.set_alias("double", "staging", 1)
        await manager.sync()
        assert await predict(manager, "double") == (1, 2.0)


async def test_bad_refs_fail_at_start(home: Path) -> None:
    with Registry(home) as registry:
        with pytest.raises(NotFound):
            await ModelManager(registry, refs=["nope"]).start()
        with pytest.raises(NotFound):
            await ModelManager(registry, refs=["double:9"]).start()
        with pytest.raises(InvalidRef):
            ModelManager(registry, refs=["double:x"])


async def test_explicit_versions_load_once_on_demand(managed: Managed, models_home: Path) -> None:
    async with managed(models_home) as (manager, _):
        first, second = await asyncio.gather(
            manager.version("double", 2), manager.version("double", 2)
        )
        assert first is second
        assert first.version == 2
        assert manager.served_versions("double") == [1, 2]
        assert manager.route("double").version == 1
        with pytest.raises(NotFound):
            await manager.version("double", 9)
        with pytest.raises(NotFound):
            await manager.version("plain", 1)  # not served at all


async def test_pinned_version_survives_a_swap_away(managed: Managed, home: Path) -> None:
    async with managed(home) as (manager, registry):
        registry.set_alias("double", "production", 2)
        await manager.sync()
        pinned = await manager.version("double", 1)
        registry.set_alias("double", "production", 1)
        await manager.sync()
        registry.set_alias("double", "production", 2)
        await manager.sync()
        assert manager.route("double").version == 2
        assert not pinned.retired
        assert (await pinned.batcher.submit({"x": X}))["output"][0, 0] == 2.0


async def test_unload_and_load(managed: Managed, home: Path) -> None:
    async with managed(home) as (manager, registry):
        await manager.version("double", 2)
        await manager.unload("double")
        with pytest.raises(Unavailable, match="unloaded"):
            manager.route("double")
        with pytest.raises(Unavailable):
            await manager.version("double", 2)
        assert manager.served_versions("double") == []
        registry.set_alias("double", "production", 2)
        await manager.sync()
        with pytest.raises(Unavailable, match="unloaded"):
            manager.route("double")
        await manager.load("double")
        assert await predict(manager, "double") == (2, 3.0)
        with pytest.raises(NotFound):
            await manager.unload("nope")


async def test_a_version_that_fails_to_load_does_not_stop_the_others(
    managed: Managed, home: Path
) -> None:
    with Registry(home) as registry:
        digest = registry.get("clf:1").artifacts["torchscript"].sha256
    (blob,) = [p for p in (home / "artifacts").rglob("*") if p.is_file() and digest in p.name]
    blob.write_bytes(b"corrupted")
    async with managed(home) as (manager, _):
        assert await predict(manager, "double") == (1, 2.0)
        with pytest.raises(Unavailable, match="failed to load"):
            manager.route("clf")
        entries = {e["name"]: e for e in await manager.index()}
        assert entries["clf"]["state"] == "UNAVAILABLE"
        assert entries["double"]["state"] == "READY"


async def test_close_refuses_new_work(managed: Managed, models_home: Path) -> None:
    async with managed(models_home) as (manager, _):
        served = manager.route("double")
    assert not manager.ready
    assert manager.routes == {}
    with pytest.raises(Unavailable):
        await served.batcher.submit({"x": X})
