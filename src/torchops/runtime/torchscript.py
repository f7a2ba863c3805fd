"""TorchScript archives (``torch.jit.save``): the trainable form of a version."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

from torchops.errors import InvalidInput, Unavailable
from torchops.runtime._archive import check_torchscript_archive
from torchops.runtime._torch import flatten_outputs, set_threads, to_arrays, to_tensors
from torchops.runtime.base import Runtime
from torchops.types import Array, Signature

__all__ = ["TorchScriptRuntime", "load_torchscript"]


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    """Load a TorchScript archive on the CPU in eval mode; anything else → ``InvalidInput``.

    The zip layout is checked before torch sees the bytes, so a pickle or a
    ``torch.save`` file is refused without being unpickled.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"a TorchScript archive must be bytes, got {type(data).__name__}")
    data = bytes(data)
    check_torchscript_archive(data)
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch raises many types for bad archives
        raise InvalidInput(
            f"not a loadable TorchScript archive: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if not isinstance(module, torch.jit.ScriptModule):
        raise InvalidInput("not a TorchScript module (a scripted function is not accepted)")
    module.eval()
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


class TorchScriptRuntime(Runtime):
    """Runs a TorchScript archive under ``torch.inference_mode``.

    ``num_threads`` sets torch's intra-op threads, which is process-wide.
    """

    format = "torchscript"

    def __init__(self, data: bytes, signature: Signature, *, num_threads: int | None = None):
        super().__init__(signature)
        self.num_threads = num_threads
        set_threads(num_threads)
        self._module: torch.jit.ScriptModule | None = load_torchscript(data)

    def _run(self, arrays: list[Array]) -> Sequence[Array]:
        module = self._module
        if module is None:
            raise Unavailable(f"this {self.format} runtime is closed")
        with torch.inference_mode():
            return to_arrays(flatten_outputs(module(*to_tensors(arrays))))

    def _release(self) -> None:
        self._module = None
