"""Tiny models and packages for the registry tests, and the worker run in child processes."""

from __future__ import annotations

import io
import multiprocessing.synchronize
from collections import Counter
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from sqlalchemy import func, select

from torchops.packaging import ExportReport, Package
from torchops.registry import Registry, store
from torchops.types import Signature, TensorSpec

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "float32", (-1, 4)),),
    outputs=(TensorSpec("output", "float32", (-1, 3)),),
    task="classification",
    labels=("a", "b", "c"),
)
EXAMPLE = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def tiny_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def tiny_package(seed: int = 0, *, reference: bool = False) -> Package:
    """A package built by hand: scripted TorchScript, safetensors weights and example."""
    model = tiny_model(seed)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)  # type: ignore[no-untyped-call]
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    blobs = {
        "torchscript": buffer.getvalue(),
        "weights": safetensors.numpy.save(weights),
        "example": safetensors.numpy.save({"x": EXAMPLE}),
    }
    if reference:
        sample = np.random.default_rng(seed).normal(size=(16, 4)).astype(np.float32)
        blobs["reference"] = safetensors.numpy.save({"x": sample})
    report = ExportReport(
        format="torchscript",
        ok=True,
        error=None,
        max_abs_diff=0.0,
        max_rel_diff=0.0,
        seconds=0.01,
        details={},
    )
    return Package(
        signature=SIGNATURE,
        blobs=blobs,
        reports=[report],
        details={"torchscript_method": "script"},
    )


def snapshot(registry: Registry) -> tuple[dict[str, int], list[str]]:
    """Row counts of every table and the stored blobs: to show nothing changed."""
    counts: Counter[str] = Counter()
    with registry._engine.connect() as conn:
        for name, table in store.metadata.tables.items():
            counts[name] = conn.execute(select(func.count()).select_from(table)).scalar_one()
    return dict(counts), sorted(digest for digest, _ in registry._blobs.blobs())


def register_many(
    home: str, url: str, worker: int, count: int, start: multiprocessing.synchronize.Event
) -> None:
    """Child process: wait for the start signal, then register ``count`` versions."""
    packages = [tiny_package(seed=1000 * worker + i) for i in range(count)]
    with Registry(Path(home), url=url) as registry:
        start.wait(60)
        for i, pkg in enumerate(packages):
            registry.register_package(
                "racer", pkg, tags={"worker": str(worker), "i": str(i)}, actor=f"w{worker}"
            )


def register_forever(home: str, url: str) -> None:
    """Child process: register new versions back to back until killed.

    Only the weights and reference blobs change between versions (fresh random bytes, so
    every registration writes new blobs), which keeps the loop inside the registry.
    """
    base = tiny_package(0, reference=True)
    rng = np.random.default_rng()
    with Registry(Path(home), url=url) as registry:
        while True:
            blobs = dict(base.blobs)
            blobs["weights"] = safetensors.numpy.save(
                {"w": rng.normal(size=(64, 64)).astype(np.float32)}
            )
            blobs["reference"] = safetensors.numpy.save(
                {"x": rng.normal(size=(256, 4)).astype(np.float32)}
            )
            pkg = Package(base.signature, blobs, base.reports, base.details)
            registry.register_package("crashy", pkg)
