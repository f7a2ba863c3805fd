"""Small real models in a real registry, and an in-process server around them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from _models import LABELS, Mul, Slow, classifier
from torchops.registry import Registry
from torchops.serving.app import TorchopsApp, create_app
from torchops.serving.auth import TokenAuth
from torchops.serving.manager import ModelManager
from torchops.serving.service import InferenceService

TOKEN = "test-token-0123456789"


class Fragile(nn.Module):
    """Doubles its input, but raises on any value above 100 (a model bug on odd input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 100.0).any()):
            raise RuntimeError("fragile model cannot take values above 100")
        return x * 2.0


def register_all(home: Path) -> None:
    """``double`` (v1 x2 production, v2 x3), ``clf`` (labels), ``fragile``, ``slow``,
    and ``plain`` (x5, no alias)."""
    with Registry(home) as registry:
        example = torch.ones(2, 4)
        kw: dict[str, Any] = {"formats": ("torchscript",)}
        registry.register("double", Mul(2.0), example, **kw)
        registry.register("double", Mul(3.0), example, **kw)
        registry.set_alias("double", "production", 1)
        registry.register("clf", classifier(), example, labels=LABELS, **kw)
        registry.set_alias("clf", "production", 1)
        registry.register("fragile", Fragile(), example, **kw)
        registry.set_alias("fragile", "production", 1)
        registry.register("slow", Slow(6000), example, **kw)
        registry.set_alias("slow", "production", 1)
        registry.register("plain", Mul(5.0), example, **kw)


@pytest.fixture(scope="session")
def models_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry home with the test models; tests must not change it (copy it instead)."""
    home = tmp_path_factory.mktemp("serving-models")
    register_all(home)
    return home


@pytest.fixture
def home(models_home: Path, tmp_path: Path) -> Path:
    """A private copy of the model registry that a test may change."""
    import shutil

    target = tmp_path / "home"
    shutil.copytree(models_home, target)
    return target


Serve = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, TorchopsApp]]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def serve() -> Serve:
    """``async with serve(home, **options) as (client, app)``: a started in-process server."""

    @asynccontextmanager
    async def running(
        home: Path,
        *,
        refs: tuple[str, ...] = (),
        start: bool = True,
        manager_options: dict[str, Any] | None = None,
        **service_options: Any,
    ) -> AsyncIterator[tuple[httpx.AsyncClient, TorchopsApp]]:
        registry = Registry(home)
        options: dict[str, Any] = {"poll_interval_s": 3600.0, **(manager_options or {})}
        manager = ModelManager(registry, refs=refs, **options)
        service_options.setdefault("auth", TokenAuth(TOKEN))
        app = create_app(InferenceService(manager, **service_options))
        transport = httpx.ASGITransport(app=app)
        try:
            if start:
                await app.startup()
            async with httpx.AsyncClient(transport=transport, base_url="http://torchops") as c:
                yield c, app
        finally:
            await app.shutdown()
            registry.close()

    return running
