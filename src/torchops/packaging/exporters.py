"""Turn a module into bytes of each format. No parity checks here (see ``package``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "export_onnx",
    "export_program",
    "save_exported",
    "save_torchscript",
    "script",
    "trace",
]


def script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    module = torch.jit.script(model)
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"torch.jit.script returned {type(module).__name__}")
    return module


def trace(model: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``args``; non-strict so list and dict outputs are allowed.

    The trace is not re-checked here: ``package`` compares it with the eager model at
    two batch sizes, which also catches a batch size baked into the graph.
    """
    module = torch.jit.trace(  # type: ignore[no-untyped-call]
        model, args, strict=False, check_trace=False
    )
    if not isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"torch.jit.trace returned {type(module).__name__}")
    return module


def save_torchscript(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _batch_shapes(args: Sequence[torch.Tensor]) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in args)


def export_program(
    model: torch.nn.Module, args: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension shared by every input.

    A TorchScript module is first converted to an ExportedProgram (torch's TorchScript
    converter), then exported again with the batch made dynamic.
    """
    if isinstance(model, torch.jit.ScriptModule):
        from torch._export.converter import TS2EPConverter

        converted = TS2EPConverter(model, args).convert()
        model = converted.module()
    return torch.export.export(model, args, dynamic_shapes=_batch_shapes(args))


def save_exported(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export_onnx(
    program: torch.export.ExportedProgram,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> bytes:
    """ONNX bytes from the dynamo exporter, given the program ``export_program`` made (its
    batch is already dynamic). Nothing is printed (``verbose=False``) and nothing is
    written to disk (``report=False``)."""
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        verbose=False,
        report=False,
    )
    if onnx_program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    data: bytes = onnx_program.model_proto.SerializeToString()
    return data
