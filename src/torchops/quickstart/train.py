"""Mini-batch training and evaluation of a classifier on in-memory arrays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from torchops.types import Array

if TYPE_CHECKING:
    from torchops.quickstart.data import DigitsData
    from torchops.quickstart.model import DigitsMLP

__all__ = ["EpochStats", "Evaluation", "evaluate", "fit_digits", "train_classifier"]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Mean cross-entropy, accuracy and macro-averaged F1 on one labelled set."""

    loss: float
    accuracy: float
    f1_macro: float

    def as_metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "f1_macro": self.f1_macro, "loss": self.loss}


@dataclass(frozen=True, slots=True)
class EpochStats:
    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    test: Evaluation


def evaluate(model: nn.Module, x: Array, y: Array) -> Evaluation:
    """Score ``model`` (in eval mode, without gradients) on ``x`` with true classes ``y``."""
    from sklearn.metrics import f1_score

    was_training = model.training
    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(x))
        target = torch.from_numpy(y)
        loss = float(nn.functional.cross_entropy(logits, target))
        predicted = logits.argmax(dim=1).numpy()
    model.train(was_training)
    accuracy = float(np.mean(predicted == y))
    f1 = float(f1_score(y, predicted, average="macro", zero_division=0))
    return Evaluation(loss=loss, accuracy=accuracy, f1_macro=f1)


def train_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_train: Array,
    y_train: Array,
    x_test: Array,
    y_test: Array,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> int:
    """Train for ``epochs`` shuffled passes; returns the number of optimizer steps taken."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total_loss = 0.0
        correct = 0
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            logits = model(x[index])
            loss = nn.functional.cross_entropy(logits, y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            step += 1
            total_loss += float(loss.detach()) * len(index)
            correct += int((logits.detach().argmax(dim=1) == y[index]).sum())
        stats = EpochStats(
            epoch=epoch,
            step=step,
            train_loss=total_loss / len(x),
            train_accuracy=correct / len(x),
            test=evaluate(model, x_test, y_test),
        )
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    return step


def fit_digits(*, epochs: int = 15, seed: int = 0) -> tuple[DigitsData, DigitsMLP]:
    """The quickstart's digits split and its MLP trained with the quickstart's recipe
    (Adam, lr 3e-3, batches of 64), silently; the model is returned in eval mode."""
    from torchops.quickstart.data import load_digits_data
    from torchops.quickstart.model import DigitsMLP

    data = load_digits_data(seed=seed)
    torch.manual_seed(seed)
    model = DigitsMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_classifier(
        model,
        optimizer,
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        epochs=epochs,
        batch_size=64,
        seed=seed,
    )
    return data, model.eval()
