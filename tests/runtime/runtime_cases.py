"""The models of the runtime conformance suite, packaged once per session."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from torchops.packaging import Package, package
from torchops.types import Array

VOCAB = 11


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(torch.relu(self.norm(self.conv(image))), 2)
        return self.head(h.flatten(1))


class TwoInputs(torch.nn.Module):
    """A float input and an int64 token input."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(6, 4)
        self.embed = torch.nn.Embedding(VOCAB, 4)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.embed(tokens).mean(dim=1)


class TwoOutputs(torch.nn.Module):
    """Logits and the predicted class (int64)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.dense(x)
        return logits, logits.argmax(dim=1)


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    sample: Callable[[int, int], dict[str, Array]]
    package: Package

    def eager(self, inputs: dict[str, Array]) -> list[Array]:
        with torch.no_grad():
            out = self.model(
                *(torch.from_numpy(inputs[n]) for n in self.package.signature.input_names)
            )
        outs = out if isinstance(out, tuple) else (out,)
        return [t.numpy() for t in outs]


def _floats(*shape: int) -> Callable[[int, int], dict[str, Array]]:
    def sample(batch: int, seed: int) -> dict[str, Array]:
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((batch, *shape)).astype(np.float32)}

    return sample


def _image(batch: int, seed: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)}


def _two(batch: int, seed: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 6)).astype(np.float32),
        "tokens": rng.integers(0, VOCAB, size=(batch, 3), dtype=np.int64),
    }


def build(name: str) -> Case:
    torch.manual_seed(0)
    sample: Callable[[int, int], dict[str, Array]]
    if name == "mlp":
        model: torch.nn.Module = MLP()
        sample = _floats(16)
        kwargs: dict[str, object] = {"labels": ["a", "b", "c", "d", "e"]}
    elif name == "cnn":
        model, sample, kwargs = CNN(), _image, {"task": "classification"}
    elif name == "two_inputs":
        model, sample, kwargs = TwoInputs(), _two, {"task": "regression"}
    else:
        model, sample, kwargs = TwoOutputs(), _floats(8), {"output_names": ["logits", "label"]}
    model.eval()
    example = sample(4, 123)
    args = tuple(torch.from_numpy(a) for a in example.values())
    pkg = package(model, args if len(args) > 1 else args[0], **kwargs)  # type: ignore[arg-type]
    return Case(name, model, sample, pkg)


MODELS = ("mlp", "cnn", "two_inputs", "two_outputs")
