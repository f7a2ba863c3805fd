from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torchops.quickstart.data import load_digits_data
from torchops.quickstart.model import DigitsMLP
from torchops.quickstart.train import EpochStats, evaluate, train_classifier


class _Fixed(nn.Module):
    """Predicts class 0 for every row with a positive first feature, else class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, :1]
        return torch.cat([first * 10, -first * 10], dim=1)


def test_evaluate_scores_predictions() -> None:
    x = np.array([[1.0], [1.0], [-1.0], [-1.0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1], dtype=np.int64)
    result = evaluate(_Fixed(), x, y)
    assert result.accuracy == pytest.approx(0.75)
    # predictions [0, 0, 1, 1]: class 0 has tp 1, fp 1, fn 0 -> F1 2/3;
    # class 1 has tp 2, fp 0, fn 1 -> F1 0.8
    assert result.f1_macro == pytest.approx((2 / 3 + 0.8) / 2)
    logits = _Fixed()(torch.from_numpy(x))
    expected_loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    assert result.loss == pytest.approx(expected_loss)


def _train(seed: int, epochs: int) -> tuple[DigitsMLP, list[EpochStats], int]:
    data = load_digits_data(seed=0)
    torch.manual_seed(seed)
    model = DigitsMLP(hidden=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    seen: list[EpochStats] = []
    steps = train_classifier(
        model, optimizer, data.x_train, data.y_train, data.x_test, data.y_test,
        epochs=epochs, batch_size=64, seed=seed, on_epoch=seen.append,
    )  # fmt: skip
    return model, seen, steps


def test_training_learns_and_reports_every_epoch() -> None:
    model, seen, steps = _train(seed=0, epochs=4)
    assert [s.epoch for s in seen] == [1, 2, 3, 4]
    assert steps == seen[-1].step == 4 * 22  # 1347 training images in batches of 64
    assert seen[-1].train_loss < seen[0].train_loss
    assert seen[-1].test.accuracy > 0.85
    assert not model.training


def test_training_is_reproducible_from_the_seed() -> None:
    a, _, _ = _train(seed=3, epochs=2)
    b, _, _ = _train(seed=3, epochs=2)
    c, _, _ = _train(seed=4, epochs=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )
