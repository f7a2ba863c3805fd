"""``torch.export`` programs saved with ``torch.export.save`` (``.pt2``)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchops.errors import InvalidInput, Unavailable
from torchops.runtime._archive import check_pt2_archive
from torchops.runtime._torch import flatten_outputs, set_threads, to_arrays, to_tensors
from torchops.runtime.base import Runtime
from torchops.types import Array, Signature

__all__ = ["ExportedRuntime", "load_exported"]


def load_exported(data: bytes) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` archive of plain tensors; anything else → ``InvalidInput``.

    The archive is checked first (no pickled entries, no custom objects), because
    ``torch.export.load`` would otherwise fall back to full unpickling for some entries.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"a torch.export archive must be bytes, got {type(data).__name__}")
    data = bytes(data)
    check_pt2_archive(data)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many types for bad archives
        text = str(exc).strip().splitlines()
        raise InvalidInput(
            f"not a loadable torch.export archive: {type(exc).__name__}: "
            f"{text[0][:300] if text else ''}"
        ) from None


class ExportedRuntime(Runtime):
    """Runs an ``ExportedProgram`` (its ``.module()``) under ``torch.inference_mode``.

    ``num_threads`` sets torch's intra-op threads, which is process-wide.
    """

    format = "exported"

    def __init__(self, data: bytes, signature: Signature, *, num_threads: int | None = None):
        super().__init__(signature)
        self.num_threads = num_threads
        set_threads(num_threads)
        program = load_exported(data)
        try:
            self._module: Callable[..., Any] | None = program.module()
        except Exception as exc:  # a program that cannot build a module is a bad artifact
            raise InvalidInput(
                f"the torch.export archive does not build a module: {type(exc).__name__}"
            ) from None

    def _run(self, arrays: list[Array]) -> Sequence[Array]:
        module = self._module
        if module is None:
            raise Unavailable(f"this {self.format} runtime is closed")
        with torch.inference_mode():
            return to_arrays(flatten_outputs(module(*to_tensors(arrays))))

    def _release(self) -> None:
        self._module = None
