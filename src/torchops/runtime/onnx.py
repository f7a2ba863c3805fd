"""ONNX models run by onnxruntime on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnxruntime as ort

from torchops.errors import InvalidInput, Unavailable
from torchops.runtime.base import Runtime
from torchops.types import Array, Signature

__all__ = ["OnnxRuntime"]


class OnnxRuntime(Runtime):
    """Runs an ONNX model with an onnxruntime ``InferenceSession`` (CPUExecutionProvider).

    ``num_threads`` is the session's intra-op thread count (onnxruntime's default when
    None); inter-op parallelism is off, since the server runs one batch at a time.
    """

    format = "onnx"

    def __init__(self, data: bytes, signature: Signature, *, num_threads: int | None = None):
        super().__init__(signature)
        self.num_threads = num_threads
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"an ONNX model must be bytes, got {type(data).__name__}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise InvalidInput(f"num_threads must be a positive integer, got {num_threads!r}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        try:
            session = ort.InferenceSession(
                bytes(data), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own error types
            text = str(exc).strip().splitlines()
            raise InvalidInput(
                f"not a loadable ONNX model: {type(exc).__name__}: {text[0][:300] if text else ''}"
            ) from None
        known = set(signature.input_names)
        session_inputs = [i.name for i in session.get_inputs()]
        unknown = [name for name in session_inputs if name not in known]
        if unknown:
            raise InvalidInput(
                f"the ONNX model's input {unknown[0]!r} is not in its signature "
                f"({', '.join(signature.input_names)})"
            )
        n_outputs = len(session.get_outputs())
        if n_outputs != len(signature.outputs):
            raise InvalidInput(
                f"the ONNX model has {n_outputs} outputs, its signature names "
                f"{len(signature.outputs)}"
            )
        # inputs the exporter pruned (unused by the graph) are validated but not fed
        self._feed = [
            (i, spec.name)
            for i, spec in enumerate(signature.inputs)
            if spec.name in set(session_inputs)
        ]
        self._session: Any = session

    def _run(self, arrays: list[Array]) -> Sequence[Array]:
        session = self._session
        if session is None:
            raise Unavailable("this onnx runtime is closed")
        feed = {name: arrays[i] for i, name in self._feed}
        outputs: list[Array] = session.run(None, feed)
        return outputs

    def _release(self) -> None:
        self._session = None
