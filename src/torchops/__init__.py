"""torchops: run trained PyTorch models in production and keep them healthy.

Importing torchops does no work: heavy modules load on first use of a name.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ModelRef",
    "ModelVersion",
    "Registry",
    "Runtime",
    "Settings",
    "Signature",
    "TensorSpec",
    "TorchopsError",
    "__version__",
    "load_checkpoint",
    "save_checkpoint",
]

_LAZY = {
    "ModelRef": "torchops.refs",
    "ModelVersion": "torchops.types",
    "Registry": "torchops.registry",
    "Runtime": "torchops.runtime",
    "Settings": "torchops.config",
    "Signature": "torchops.types",
    "TensorSpec": "torchops.types",
    "TorchopsError": "torchops.errors",
    "load_checkpoint": "torchops.packaging",
    "save_checkpoint": "torchops.packaging",
}

if TYPE_CHECKING:
    from torchops.config import Settings
    from torchops.errors import TorchopsError
    from torchops.packaging import load_checkpoint, save_checkpoint
    from torchops.refs import ModelRef
    from torchops.registry import Registry
    from torchops.runtime import Runtime
    from torchops.types import ModelVersion, Signature, TensorSpec


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchops' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
