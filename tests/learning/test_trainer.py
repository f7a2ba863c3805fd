from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from torchops.errors import InvalidInput, TrainingFailed
from torchops.learning.replay import ReplayBuffer
from torchops.learning.trainer import IncrementalTrainer, TrainConfig, guarded_step
from torchops.runtime import load_runtime
from torchops.types import Signature, TensorSpec


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 1)
        self.b = nn.Linear(3, 1)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.a(first) + self.b(second)
        return out


def archive(model: nn.Module) -> bytes:
    torch.manual_seed(0)
    out = io.BytesIO()
    torch.jit.save(torch.jit.script(model), out)
    return out.getvalue()


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three separable classes in 8 dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    centers = rng.normal(scale=3.0, size=(3, 8))
    x = (centers[y] + rng.normal(size=(n, 8))).astype(np.float32)
    return x, y


def accuracy(data: bytes, x: np.ndarray, y: np.ndarray) -> float:
    module = torch.jit.load(io.BytesIO(data))
    with torch.inference_mode():
        return float((module(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def params(data: bytes) -> list[torch.Tensor]:
    return [p.detach().clone() for p in torch.jit.load(io.BytesIO(data)).parameters()]


def test_training_improves_a_copy_and_leaves_the_input_untouched() -> None:
    torch.manual_seed(0)
    champion = archive(Net())
    original = bytes(champion)
    before = params(champion)
    x, y = blobs(600)
    buffer = ReplayBuffer(n_classes=3)
    buffer.add({"x": x[:400]}, y[:400])
    result = IncrementalTrainer(TrainConfig(lr=1e-2, steps=60, batch_size=32)).train(
        champion, buffer
    )
    assert champion == original
    assert all(torch.equal(a, b) for a, b in zip(before, params(champion), strict=True))
    assert result.steps == 60 and result.discarded_steps == 0 and len(result.losses) == 60
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    assert accuracy(result.torchscript, x[400:], y[400:]) > accuracy(champion, x[400:], y[400:])
    assert accuracy(result.torchscript, x[400:], y[400:]) > 0.9
    # the challenger is an eval-mode archive the server can load like any version
    assert not torch.jit.load(io.BytesIO(result.torchscript)).training
    signature = Signature(
        inputs=(TensorSpec("x", "float32", (-1, 8)),),
        outputs=(TensorSpec("output", "float32", (-1, 3)),),
        task="classification",
    )
    runtime = load_runtime("torchscript", result.torchscript, signature)
    assert runtime.predict(x[:5]).shape == (5, 3)
    runtime.close()


def test_training_is_reproducible_for_a_seed() -> None:
    champion = archive(Net())
    x, y = blobs(200)
    results = []
    for _ in range(2):
        buffer = ReplayBuffer(n_classes=3, seed=5)
        buffer.add({"x": x}, y)
        results.append(IncrementalTrainer(TrainConfig(steps=10)).train(champion, buffer))
    assert results[0].losses == results[1].losses


def test_steps_with_a_non_finite_loss_are_discarded() -> None:
    champion = archive(Net())
    x, y = blobs(300)
    poison = np.full((1, 8), 3e38, dtype=np.float32)  # finite, but overflows the forward pass
    buffer = ReplayBuffer(recent=512, n_classes=3)
    buffer.add({"x": np.concatenate([x, poison])}, np.concatenate([y, [0]]))
    result = IncrementalTrainer(TrainConfig(steps=80, batch_size=32, lr=1e-2)).train(
        champion, buffer
    )
    assert result.discarded_steps > 0
    assert result.steps + result.discarded_steps == 80
    assert all(np.isfinite(result.losses))
    assert all(torch.isfinite(p).all() for p in params(result.torchscript))
    assert accuracy(result.torchscript, x, y) > 0.9


def test_every_step_discarded_raises_and_returns_nothing() -> None:
    champion = archive(Net())
    buffer = ReplayBuffer(n_classes=3)
    buffer.add({"x": np.full((4, 8), 3e38, dtype=np.float32)}, np.array([0, 1, 2, 0]))
    with pytest.raises(TrainingFailed, match="discarded"):
        IncrementalTrainer(TrainConfig(steps=5)).train(champion, buffer)


def test_steps_whose_weights_overflow_are_rolled_back() -> None:
    champion = archive(Net())
    x, y = blobs(100)
    buffer = ReplayBuffer(n_classes=3)
    buffer.add({"x": x * 1000}, y)
    # finite loss and gradients, but a step of 1e37 * gradient overflows float32 weights
    before = params(champion)
    with pytest.raises(TrainingFailed):
        IncrementalTrainer(TrainConfig(optimizer="sgd", lr=1e37, steps=3)).train(champion, buffer)
    assert all(torch.equal(a, b) for a, b in zip(before, params(champion), strict=True))


def test_a_step_that_overflows_the_weights_is_undone_with_the_optimizer_state() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.tensor([0.5, 0.5])
    assert guarded_step(optimizer, [weight])  # an ordinary step is kept
    kept = weight.detach().clone()
    momentum = optimizer.state[weight]["momentum_buffer"].clone()
    optimizer.param_groups[0]["lr"] = 1e38  # 1e38 * ~100 overflows float32
    weight.grad = torch.tensor([100.0, 100.0])
    assert not guarded_step(optimizer, [weight])
    assert torch.equal(weight.detach(), kept)
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], momentum)
    optimizer.param_groups[0]["lr"] = 0.1
    assert guarded_step(optimizer, [weight])
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), kept)


def test_l2_pull_keeps_the_challenger_near_the_champion() -> None:
    champion = archive(Net())
    x, y = blobs(300)

    def distance(pull: float) -> float:
        buffer = ReplayBuffer(n_classes=3)
        buffer.add({"x": x}, y)
        config = TrainConfig(lr=1e-2, steps=40, l2_pull=pull)
        trained = IncrementalTrainer(config).train(champion, buffer).torchscript
        pairs = zip(params(trained), params(champion), strict=True)
        return float(sum(((a - b) ** 2).sum() for a, b in pairs))

    assert distance(10.0) < 0.2 * distance(0.0)


def test_anchors_alone_train_toward_their_soft_targets() -> None:
    champion = archive(Net())
    x, _ = blobs(200)
    target = np.tile(np.array([[0.8, 0.1, 0.1]], dtype=np.float32), (200, 1))
    buffer = ReplayBuffer(n_classes=3)
    buffer.add_anchor({"x": x}, target)
    result = IncrementalTrainer(TrainConfig(lr=1e-2, steps=100)).train(champion, buffer)
    module = torch.jit.load(io.BytesIO(result.torchscript))
    with torch.inference_mode():
        probs = torch.softmax(module(torch.from_numpy(x)), dim=1).mean(0).numpy()
    assert probs == pytest.approx([0.8, 0.1, 0.1], abs=0.05)


def test_regression_and_inputs_in_forward_order() -> None:
    champion = archive(TwoInputs())
    rng = np.random.default_rng(0)
    first = rng.normal(size=(300, 2)).astype(np.float32)
    second = rng.normal(size=(300, 3)).astype(np.float32)
    y = (first @ [1.0, -2.0] + second @ [0.5, 0.0, 3.0] + 1.0).astype(np.float32)[:, None]
    buffer = ReplayBuffer(task="regression")
    buffer.add({"second": second, "first": first}, y)  # names, not order, decide
    config = TrainConfig(task="regression", lr=5e-2, steps=300)
    result = IncrementalTrainer(config).train(champion, buffer)
    assert result.losses[-1] < 0.05 < result.losses[0]


def test_refuses_what_it_cannot_train() -> None:
    champion = archive(Net())
    trainer = IncrementalTrainer(TrainConfig(steps=1))
    with pytest.raises(InvalidInput, match="empty"):
        trainer.train(champion, ReplayBuffer(n_classes=3))
    regression = ReplayBuffer(task="regression")
    regression.add({"x": np.zeros((2, 8), np.float32)}, np.zeros(2))
    with pytest.raises(InvalidInput, match="regression"):
        trainer.train(champion, regression)
    buffer = ReplayBuffer(n_classes=3)
    buffer.add({"x": np.zeros((2, 8), np.float32)}, np.zeros(2))
    with pytest.raises(InvalidInput):
        trainer.train(b"not an archive", buffer)
    wrong_names = ReplayBuffer(n_classes=3)
    wrong_names.add({"a": np.zeros((2, 8), np.float32), "b": np.zeros((2, 1), np.float32)}, [0, 1])
    with pytest.raises(InvalidInput, match="forward"):
        trainer.train(champion, wrong_names)
    five = ReplayBuffer(n_classes=5)
    five.add({"x": np.zeros((2, 8), np.float32)}, np.zeros(2))
    with pytest.raises(InvalidInput, match="classes"):
        trainer.train(champion, five)
    with pytest.raises(InvalidInput):
        TrainConfig(lr=0.0)
    with pytest.raises(InvalidInput):
        TrainConfig(steps=0)
