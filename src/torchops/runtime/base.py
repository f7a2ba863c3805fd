"""The one small interface every loaded format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from torchops.errors import InvalidInput, Unavailable
from torchops.runtime.validation import validate_inputs
from torchops.types import Array, Inputs, Outputs, Signature

__all__ = ["Runtime"]


class Runtime(ABC):
    """A loaded, warmed artifact that maps a batch of inputs to outputs.

    ``predict`` takes a numpy array (single-input models) or a mapping of input name to
    array, and returns an array (single-output models) or a dict of output name to array.
    ``predict_batch`` is the named form the server and batch predictor use: it always
    takes and returns dicts. Both validate inputs against ``signature`` (see
    ``torchops.runtime.validation`` for the casting rule) and raise ``InvalidInput``
    naming the input and the expected dtype/shape.

    Subclasses implement ``_run`` (arrays in signature order → outputs in signature
    order) and ``_release``.
    """

    format: str = ""

    def __init__(self, signature: Signature) -> None:
        self.signature = signature
        self._closed = False

    @abstractmethod
    def _run(self, arrays: list[Array]) -> Sequence[Array]:
        """Run validated, C-contiguous arrays (signature order); outputs in signature order."""

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Drop what the concrete runtime holds."""

    def predict_batch(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run one batch: every input has the same leading (batch) dimension."""
        if self._closed:
            raise Unavailable(f"this {self.format} runtime is closed")
        outputs = self._run(validate_inputs(self.signature, inputs))
        names = self.signature.output_names
        if len(outputs) != len(names):
            raise InvalidInput(
                f"the {self.format} artifact returned {len(outputs)} outputs, "
                f"its signature names {len(names)}: {', '.join(names)}"
            )
        return dict(zip(names, outputs, strict=True))

    def predict(self, inputs: Inputs) -> Outputs:
        """Predict from one array (single-input models) or a mapping of name to array."""
        if isinstance(inputs, Mapping):
            named: Mapping[str, Any] = inputs
        else:
            if len(self.signature.inputs) != 1:
                names = ", ".join(repr(n) for n in self.signature.input_names)
                raise InvalidInput(f"the model takes several inputs ({names}): pass a dict")
            named = {self.signature.inputs[0].name: inputs}
        outputs = self.predict_batch(named)
        if len(outputs) == 1:
            return next(iter(outputs.values()))
        return outputs

    def warmup(self) -> None:
        """Run the model twice on zeros so the first request is not slow.

        Also checks that the artifact's outputs agree with the signature (count, rank,
        dtype) and raises ``InvalidInput`` when they do not.
        """
        zeros = {
            spec.name: np.zeros([1 if d == -1 else d for d in spec.shape], dtype=spec.np_dtype)
            for spec in self.signature.inputs
        }
        for _ in range(2):
            outputs = self.predict_batch(zeros)
        for spec in self.signature.outputs:
            array = outputs[spec.name]
            if array.ndim != len(spec.shape) or array.dtype != spec.np_dtype:
                raise InvalidInput(
                    f"the {self.format} artifact's output {spec.name!r} is "
                    f"{list(array.shape)} {array.dtype} on a batch of 1; its signature "
                    f"says {list(spec.shape)} {spec.dtype}"
                )

    def close(self) -> None:
        """Release what the runtime holds; it cannot predict afterwards."""
        if not self._closed:
            self._closed = True
            self._release()

    def __repr__(self) -> str:
        names = ", ".join(self.signature.input_names)
        return f"{type(self).__name__}(inputs=[{names}], closed={self._closed})"
