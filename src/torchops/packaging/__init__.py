"""Turn a trained module into stored formats, checked against the eager model.

>>> from torchops.packaging import package  # doctest: +SKIP
>>> pkg = package(model, torch.randn(8, 64), labels=[str(i) for i in range(10)])  # doctest: +SKIP
>>> [r.format for r in pkg.reports if r.ok]  # doctest: +SKIP
['torchscript', 'exported', 'onnx']
"""

from __future__ import annotations

from torchops.packaging.arrays import decode_arrays, encode_arrays
from torchops.packaging.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from torchops.packaging.package import (
    ExportReport,
    Package,
    export_format,
    package,
    package_torchscript,
)
from torchops.packaging.parity import DEFAULT_ATOL, DEFAULT_RTOL
from torchops.packaging.weights import decode_state_dict, encode_state_dict

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "Checkpoint",
    "ExportReport",
    "Package",
    "decode_arrays",
    "decode_state_dict",
    "encode_arrays",
    "encode_state_dict",
    "export_format",
    "load_checkpoint",
    "package",
    "package_torchscript",
    "save_checkpoint",
]
