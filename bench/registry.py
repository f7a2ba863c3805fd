"""Registry benchmark: time ``register`` and ``Registry.load`` against a bare ``torch.jit.load``.

Usage: python bench/registry.py [--repeats N] [--registrations N] [--formats torchscript,...]

Registers a small MLP (64 -> 256 -> 256 -> 10) a few times into a temporary home, then
loads the TorchScript artifact both ways. ``Registry.load`` resolves the reference in the
database, reads the blob, checks its sha256, validates the archive and warms the runtime
up; the baseline reads the same bytes from a file with ``torch.jit.load``. Prints
medians and their ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchops.registry import Registry
from torchops.types import FORMATS


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--registrations", type=int, default=3)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]

    torch.manual_seed(1234)
    model = MLP().eval()
    example = torch.randn(4, 64)
    with tempfile.TemporaryDirectory(prefix="torchops-bench-") as tmp:
        registry = Registry(Path(tmp) / "home")
        register_times = []
        for _ in range(args.registrations):
            start = time.perf_counter()
            version = registry.register("mlp", model, example, formats=formats)
            register_times.append(time.perf_counter() - start)
        ref = f"mlp:{version.version}"
        data = registry.read_artifact(ref, "torchscript")
        path = Path(tmp) / "mlp.pt"
        path.write_bytes(data)

        def bare() -> object:
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            return module.eval()

        def bare_bytes() -> object:
            return torch.jit.load(io.BytesIO(path.read_bytes()), map_location="cpu")  # type: ignore[no-untyped-call]

        def via_registry() -> object:
            runtime = registry.load(ref, "torchscript")
            runtime.close()
            return runtime

        # one untimed round of each so first-use costs do not land in either column
        bare()
        via_registry()
        t_bare = median_seconds(bare, args.repeats)
        t_bytes = median_seconds(bare_bytes, args.repeats)
        t_read = median_seconds(lambda: registry.read_artifact(ref, "torchscript"), args.repeats)
        t_get = median_seconds(lambda: registry.get(ref), args.repeats)
        t_load = median_seconds(via_registry, args.repeats)
        registry.close()

    print(f"model: MLP 64-256-256-10, torchscript {len(data) / 1024:.0f} KiB")
    print(f"formats registered: {', '.join(version.formats)}")
    print(
        f"register ({args.registrations}x): median {statistics.median(register_times):.3f} s"
        f" (first {register_times[0]:.3f} s)"
    )
    print(f"Registry.get(ref):                      {t_get * 1e3:8.3f} ms")
    print(f"Registry.read_artifact (sha256 checked): {t_read * 1e3:8.3f} ms")
    print(f"torch.jit.load(file):                   {t_bare * 1e3:8.3f} ms")
    print(f"torch.jit.load(BytesIO(file bytes)):    {t_bytes * 1e3:8.3f} ms")
    print(f"Registry.load(ref, 'torchscript'):      {t_load * 1e3:8.3f} ms  (incl. warm-up)")
    print(
        f"ratio Registry.load / torch.jit.load:   {t_load / t_bare:8.2f}x"
        f"  (medians of {args.repeats})"
    )


if __name__ == "__main__":
    main()
