"""Incremental training of a copy of the champion's trainable form.

The champion's TorchScript archive is loaded afresh from its bytes (the caller's bytes
and any model built from them are never touched), trained in train mode for a bounded
number of steps on replay-buffer batches, and saved back to archive bytes in eval mode.
A step whose loss, gradients or resulting weights are not finite is discarded: nothing
of it reaches the weights or the optimizer state.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from torchops.errors import InvalidInput, TrainingFailed
from torchops.learning.replay import ReplayBuffer
from torchops.runtime.torchscript import load_torchscript
from torchops.types import Array, Task

__all__ = ["IncrementalTrainer", "TrainConfig", "TrainResult"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """How one update trains: optimizer, step size, regularisation and budget.

    ``l2_pull`` adds ``l2_pull * ||theta - theta_champion||^2`` to the loss, keeping the
    challenger near the champion; ``weight_decay`` is the optimizer's own.
    """

    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    l2_pull: float = 0.0
    steps: int = 50
    batch_size: int = 64
    seed: int = 0
    task: Task = "classification"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise InvalidInput(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidInput(f"lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "l2_pull"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"{name} must be a non-negative number, got {value}")
        if self.steps < 1:
            raise InvalidInput(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise InvalidInput(f"batch_size must be at least 1, got {self.batch_size}")
        if self.task not in ("classification", "regression"):
            raise InvalidInput(
                f"incremental training supports classification or regression, not {self.task!r}"
            )


@dataclass(frozen=True, slots=True)
class TrainResult:
    """The challenger's archive and how its training went (losses of the kept steps)."""

    torchscript: bytes
    steps: int
    discarded_steps: int
    losses: list[float] = field(default_factory=list)


class IncrementalTrainer:
    """Trains copies of a champion on a ``ReplayBuffer``; one instance serves many updates."""

    def __init__(self, config: TrainConfig | None = None) -> None:
        self.config = config or TrainConfig()

    def __repr__(self) -> str:
        return f"IncrementalTrainer(config={self.config!r})"

    def train(self, torchscript: bytes, buffer: ReplayBuffer) -> TrainResult:
        """Train a copy of the archive ``torchscript`` on ``buffer``; return the new archive."""
        config = self.config
        if buffer.task != config.task:
            raise InvalidInput(
                f"the replay buffer holds {buffer.task} data but the trainer is set up for "
                f"{config.task}"
            )
        if len(buffer) == 0:
            raise InvalidInput("the replay buffer is empty: nothing to train on")
        module = load_torchscript(bytes(torchscript))
        params: list[torch.Tensor] = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise InvalidInput("the model has no trainable parameters (all are frozen)")
        names = _argument_names(module)
        anchor = [p.detach().clone() for p in params] if config.l2_pull > 0 else []
        optimizer = _optimizer(config, params)
        rng = np.random.default_rng(config.seed)
        losses: list[float] = []
        discarded = 0
        module.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for _ in range(config.steps):
                x, y, _soft = buffer.sample(config.batch_size, rng=rng)
                output = _first_output(module(*_ordered(x, names)))
                loss = _loss(config.task, output, torch.from_numpy(y))
                if anchor:
                    pull = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = loss + config.l2_pull * pull
                if not bool(torch.isfinite(loss)):
                    discarded += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
                    optimizer.zero_grad(set_to_none=True)
                    discarded += 1
                    continue
                if not guarded_step(optimizer, params):
                    discarded += 1
                    continue
                losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        if not losses:
            raise TrainingFailed(
                f"all {config.steps} training steps were discarded (non-finite loss, gradients "
                f"or weights); check the feedback values and the learning rate {config.lr}"
            )
        module.eval()
        out = io.BytesIO()
        torch.jit.save(module, out)
        return TrainResult(
            torchscript=out.getvalue(),
            steps=len(losses),
            discarded_steps=discarded,
            losses=losses,
        )


def guarded_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> bool:
    """Take one optimizer step; if any weight ends up non-finite, undo it and return False.

    The weights and the optimizer state (e.g. Adam's moments) are restored exactly.
    """
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    if all(bool(torch.isfinite(p).all()) for p in params):
        return True
    with torch.no_grad():
        for p, saved in zip(params, before, strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(state)
    return False


def _optimizer(config: TrainConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _argument_names(module: torch.jit.ScriptModule) -> list[str]:
    schema: Any = getattr(module.forward, "schema", None)
    if schema is None:
        raise InvalidInput("the TorchScript module has no forward method to train")
    return [str(argument.name) for argument in schema.arguments[1:]]


def _ordered(x: Mapping[str, Array], names: Sequence[str]) -> list[torch.Tensor]:
    """The buffer's named inputs in the order of the model's ``forward`` arguments."""
    if set(x) == set(names):
        return [torch.from_numpy(np.ascontiguousarray(x[name])) for name in names]
    if len(x) == 1 and len(names) == 1:
        return [torch.from_numpy(np.ascontiguousarray(next(iter(x.values()))))]
    raise InvalidInput(
        f"the replay buffer's inputs {sorted(x)} do not match the model's forward "
        f"arguments {list(names)}"
    )


def _first_output(output: Any) -> torch.Tensor:
    """The tensor that is trained: the output itself, or the first of a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and output:
        first = next(iter(output.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise InvalidInput(f"cannot train on a model output of type {type(output).__name__}")


def _loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy (one-hot rows = ordinary cross-entropy) or mean squared error."""
    if task == "classification":
        if output.ndim != 2 or output.shape != target.shape:
            raise InvalidInput(
                f"the model outputs shape {list(output.shape)} but the buffer has "
                f"{target.shape[1]} classes"
            )
        log_p = torch.log_softmax(output.float(), dim=1)
        return -(target * log_p).sum(dim=1).mean()
    if output.numel() != target.numel() or output.shape[0] != target.shape[0]:
        raise InvalidInput(
            f"the model outputs shape {list(output.shape)} but the targets have shape "
            f"{list(target.shape)}"
        )
    prediction = output.float().reshape(target.shape)
    return torch.mean((prediction - target) ** 2)
