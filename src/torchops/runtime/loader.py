"""``load_runtime``: bytes of a recorded format → a warmed ``Runtime``."""

from __future__ import annotations

from torchops.errors import InvalidInput
from torchops.runtime.base import Runtime
from torchops.runtime.exported import ExportedRuntime
from torchops.runtime.onnx import OnnxRuntime
from torchops.runtime.torchscript import TorchScriptRuntime
from torchops.types import FORMATS, Signature

__all__ = ["load_runtime"]


def load_runtime(
    format: str,
    data: bytes,
    signature: Signature,
    *,
    warmup: bool = True,
    num_threads: int | None = None,
) -> Runtime:
    """Load ``data`` (an artifact of ``format``) as a Runtime, warmed up unless told not to.

    Bytes that are not a valid artifact of that format, or whose outputs disagree with
    ``signature``, raise ``InvalidInput``.
    """
    runtime: Runtime
    if format == "torchscript":
        runtime = TorchScriptRuntime(data, signature, num_threads=num_threads)
    elif format == "exported":
        runtime = ExportedRuntime(data, signature, num_threads=num_threads)
    elif format == "onnx":
        runtime = OnnxRuntime(data, signature, num_threads=num_threads)
    else:
        raise InvalidInput(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if warmup:
        try:
            runtime.warmup()
        except InvalidInput:
            runtime.close()
            raise
        except Exception as exc:  # the artifact cannot run valid zeros
            runtime.close()
            raise InvalidInput(
                f"the {format} artifact failed on a warm-up batch of zeros: "
                f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            ) from None
    return runtime
