"""Load a recorded format into a ``Runtime`` with one small interface.

>>> from torchops.runtime import load_runtime  # doctest: +SKIP
>>> runtime = load_runtime("onnx", data, signature)  # doctest: +SKIP
>>> runtime.predict(x)  # doctest: +SKIP
"""

from __future__ import annotations

from torchops.runtime.base import Runtime
from torchops.runtime.exported import ExportedRuntime
from torchops.runtime.loader import load_runtime
from torchops.runtime.onnx import OnnxRuntime
from torchops.runtime.torchscript import TorchScriptRuntime
from torchops.runtime.validation import validate_inputs

__all__ = [
    "ExportedRuntime",
    "OnnxRuntime",
    "Runtime",
    "TorchScriptRuntime",
    "load_runtime",
    "validate_inputs",
]
