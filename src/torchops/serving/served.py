"""One loaded version as the server holds it, and what the protocol says about it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torchops.serving.batcher import Batcher
from torchops.serving.datatypes import datatype_of
from torchops.types import ModelVersion, Signature, TensorSpec

if TYPE_CHECKING:
    from torchops.runtime import Runtime

__all__ = ["PLATFORMS", "ServedVersion"]

#: the OIP ``platform`` of each serving format
PLATFORMS = {
    "torchscript": "pytorch_torchscript",
    "exported": "pytorch_exported",
    "onnx": "onnxruntime_onnx",
}


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": list(spec.shape)}


@dataclass(eq=False)
class ServedVersion:
    """One loaded version: its runtime, its batcher and what the protocol says about it."""

    name: str
    version: int
    info: ModelVersion
    runtime: Runtime
    batcher: Batcher
    max_batch_size: int
    version_str: str = field(init=False)
    signature: Signature = field(init=False)
    platform: str = field(init=False)
    #: set once the route no longer points here; requests that raced the switch retry
    retired: bool = False

    def __post_init__(self) -> None:
        self.version_str = str(self.version)
        self.signature = self.info.signature
        self.platform = PLATFORMS.get(self.runtime.format, self.runtime.format)

    def metadata(self, versions: Sequence[int]) -> dict[str, Any]:
        """The OIP model metadata, listing ``versions`` as the versions served."""
        sig = self.signature
        meta: dict[str, Any] = {
            "name": self.name,
            "versions": [str(v) for v in versions],
            "platform": self.platform,
            "inputs": [tensor_metadata(t) for t in sig.inputs],
            "outputs": [tensor_metadata(t) for t in sig.outputs],
        }
        meta["parameters"] = {
            "task": sig.task,
            "max_batch_size": self.max_batch_size,
            **({"labels": list(sig.labels)} if sig.labels is not None else {}),
        }
        return meta

    def config(self) -> dict[str, Any]:
        """A Triton-style model configuration (``GET …/config``, which tritonclient reads)."""
        sig = self.signature
        batched = all(t.shape[:1] == (-1,) for t in (*sig.inputs, *sig.outputs))

        def tensors(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
            return [
                {
                    "name": t.name,
                    "data_type": _CONFIG_TYPES.get(datatype_of(t.dtype), "TYPE_INVALID"),
                    "dims": list(t.shape[1:] if batched else t.shape),
                }
                for t in specs
            ]

        return {
            "name": self.name,
            "platform": self.platform,
            "max_batch_size": self.max_batch_size if batched else 0,
            "input": tensors(sig.inputs),
            "output": tensors(sig.outputs),
        }


_CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}
