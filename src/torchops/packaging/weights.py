"""Model weights as safetensors: the only way torchops stores or reads a state dict."""

from __future__ import annotations

import safetensors.torch
import torch

from torchops.errors import InvalidInput

__all__ = ["check_state_dict", "decode_state_dict", "encode_state_dict"]


def encode_state_dict(module: torch.nn.Module) -> bytes:
    """``module.state_dict()`` as safetensors bytes. Tensors that share memory (tied
    weights) are stored once per name, as safetensors requires."""
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        t = t.clone() if key in seen or t.untyped_storage().size() != t.nbytes else t
        seen.add(key)
        tensors[name] = t.contiguous()
    return bytes(safetensors.torch.save(tensors))


def decode_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    """Safetensors bytes → tensors on the CPU; anything else → ``InvalidInput``."""
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as exc:  # safetensors raises its own error type
        raise InvalidInput(f"not a safetensors weights file: {exc}") from None


def check_state_dict(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Raise ``InvalidInput`` unless ``weights`` has exactly ``module``'s names and shapes,
    so a failed load leaves the module untouched."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}")
        raise InvalidInput(f"weights do not fit the model: {'; '.join(parts)}")
    for name, tensor in own.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise InvalidInput(
                f"weights do not fit the model: {name!r} is {list(weights[name].shape)}, "
                f"the model expects {list(tensor.shape)}"
            )
