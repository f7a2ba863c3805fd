"""State dicts as safetensors, including tied weights."""

from __future__ import annotations

import pytest
import torch

from torchops.errors import InvalidInput
from torchops.packaging.weights import check_state_dict, decode_state_dict, encode_state_dict


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.out = torch.nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weights_round_trip() -> None:
    torch.manual_seed(0)
    model = Tied()
    weights = decode_state_dict(encode_state_dict(model))
    assert set(weights) == {"embed.weight", "out.weight"}
    torch.testing.assert_close(weights["out.weight"], model.embed.weight.detach())
    fresh = Tied()
    check_state_dict(fresh, weights)
    fresh.load_state_dict(weights)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.out.weight is fresh.embed.weight


def test_mismatches_are_named() -> None:
    weights = decode_state_dict(encode_state_dict(torch.nn.Linear(3, 2)))
    with pytest.raises(InvalidInput, match=r"'weight' is \[2, 3\], the model expects \[2, 4\]"):
        check_state_dict(torch.nn.Linear(4, 2), weights)
    with pytest.raises(InvalidInput, match="missing bias"):
        check_state_dict(torch.nn.Linear(3, 2), {"weight": weights["weight"]})


def test_garbage_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="not a safetensors weights file"):
        decode_state_dict(b"\x00" * 64)
