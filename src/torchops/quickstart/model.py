"""The quickstart's classifier: a small MLP over the 64 pixels of a digit."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsMLP"]


class DigitsMLP(nn.Module):
    """64 pixels in, one logit per class out (softmax them for probabilities)."""

    def __init__(self, n_features: int = 64, n_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.n_features = n_features
        self.n_classes = n_classes
        self.hidden = hidden
        self.layers = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out
