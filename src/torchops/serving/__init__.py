"""The inference server: Open Inference Protocol v2 over HTTP, dynamic batching, hot swaps.

``create_app`` builds the ASGI application, ``ModelManager`` keeps the served versions in
step with the registry's aliases, ``serve`` runs it all under an HTTP server.
Importing this package does no work; names load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "Batcher",
    "HttpServer",
    "InferenceService",
    "ModelManager",
    "ServingMetrics",
    "TokenAuth",
    "TorchopsApp",
    "create_app",
    "serve",
]

_LAZY = {
    "Batcher": "torchops.serving.batcher",
    "HttpServer": "torchops.serving.httpd",
    "InferenceService": "torchops.serving.service",
    "ModelManager": "torchops.serving.manager",
    "ServingMetrics": "torchops.serving.metrics",
    "TokenAuth": "torchops.serving.auth",
    "TorchopsApp": "torchops.serving.app",
    "create_app": "torchops.serving.app",
    "serve": "torchops.serving.server",
}

if TYPE_CHECKING:
    from torchops.serving.app import TorchopsApp, create_app
    from torchops.serving.auth import TokenAuth
    from torchops.serving.batcher import Batcher
    from torchops.serving.httpd import HttpServer
    from torchops.serving.manager import ModelManager
    from torchops.serving.metrics import ServingMetrics
    from torchops.serving.server import serve
    from torchops.serving.service import InferenceService


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchops.serving' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
