"""Small real models the serving and end-to-end tests register (shared by their conftests)."""

from __future__ import annotations

import torch
from torch import nn

LABELS = ["cat", "dog", "emu"]


class Mul(nn.Module):
    """``x * k``: versions with different ``k`` answer differently and predictably."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


class Slow(nn.Module):
    """Repeated matmuls: a call takes long enough that requests queue behind it, or that
    it is still running when a test acts."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.w = nn.Parameter(torch.eye(256) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.repeat(1, 64)
        for _ in range(self.steps):
            y = torch.tanh(y @ self.w)
        return x + y[:, :4] * 0.0


def classifier() -> nn.Module:
    """A fixed 4-feature, 3-class linear classifier (labels ``LABELS``)."""
    torch.manual_seed(0)
    return nn.Linear(4, 3).eval()
