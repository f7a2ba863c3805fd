"""Helpers shared by the runtimes that run on torch (TorchScript and torch.export)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from torchops.errors import InvalidInput
from torchops.types import Array

__all__ = ["flatten_outputs", "set_threads", "to_arrays", "to_tensors"]


def to_tensors(arrays: Sequence[Array]) -> list[torch.Tensor]:
    """Wrap arrays without copying; read-only arrays (e.g. decoded from a request buffer)
    are copied, since torch may write into its inputs."""
    return [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]


def flatten_outputs(result: Any) -> list[torch.Tensor]:
    """A model's return value as a flat list: a tensor, a tuple/list of tensors, or a dict
    of tensors (in insertion order, as torch.export and ONNX flatten it)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise InvalidInput(
        f"the model returned {type(result).__name__}; expected a tensor, a tuple of tensors "
        "or a dict of tensors"
    )


def to_arrays(tensors: Sequence[torch.Tensor]) -> list[Array]:
    out: list[Array] = []
    for t in tensors:
        if t.device.type != "cpu":
            t = t.cpu()
        out.append(t.numpy() if not t.requires_grad else t.detach().numpy())
    return out


def set_threads(num_threads: int | None) -> None:
    """Set torch's intra-op thread count (process-wide) when one is given."""
    if num_threads is None:
        return
    if not isinstance(num_threads, int) or num_threads < 1:
        raise InvalidInput(f"num_threads must be a positive integer, got {num_threads!r}")
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
