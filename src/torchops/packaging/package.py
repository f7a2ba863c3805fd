"""``package``: a module plus example inputs → every format, checked against eager."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchops.errors import ExportFailed, InvalidInput
from torchops.packaging import exporters
from torchops.packaging.arrays import encode_arrays
from torchops.packaging.derive import Deriver, ExportReport
from torchops.packaging.parity import DEFAULT_ATOL, DEFAULT_RTOL
from torchops.packaging.signature import Probe, normalize_examples, probe
from torchops.packaging.weights import encode_state_dict
from torchops.runtime.torchscript import load_torchscript
from torchops.runtime.validation import validate_inputs
from torchops.types import FORMATS, Array, Inputs, Signature, Task

__all__ = ["ExportReport", "Package", "export_format", "package", "package_torchscript"]


@dataclass
class Package:
    """Everything a registry stores for one version.

    ``blobs`` maps an artifact kind to its bytes: ``torchscript`` (always), ``exported``
    and ``onnx`` when they exported with parity, ``weights``, ``example`` and, when given,
    ``reference``. ``reports`` has one entry per attempted format.
    """

    signature: Signature
    blobs: dict[str, bytes]
    reports: list[ExportReport]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(f for f in FORMATS if f in self.blobs)

    def report(self, format: str) -> ExportReport | None:
        return next((r for r in self.reports if r.format == format), None)


def _check_formats(formats: Sequence[str]) -> list[str]:
    if isinstance(formats, str):
        formats = [formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise InvalidInput(f"unknown format {unknown[0]!r}; expected some of {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in formats]


def _torchscript(model: torch.nn.Module, deriver: Deriver) -> tuple[bytes, ExportReport]:
    """Script, else trace; the first whose archive matches eager wins."""
    attempts: list[tuple[str, Callable[[], torch.jit.ScriptModule]]]
    if isinstance(model, torch.jit.ScriptModule):
        given: torch.jit.ScriptModule = model
        attempts = [("given", lambda: given)]
    else:
        attempts = [
            ("script", lambda: exporters.script(model)),
            ("trace", lambda: exporters.trace(model, deriver.args)),
        ]
    errors: list[str] = []
    for method, make in attempts:

        def build(make: Callable[[], torch.jit.ScriptModule] = make) -> bytes:
            return exporters.save_torchscript(make())

        data, report = deriver.attempt("torchscript", build)
        report.details["method"] = method
        if errors:
            report.details["script_error"] = errors[0]
        if data is not None:
            return data, report
        errors.append(f"{method}: {report.error}")
    raise ExportFailed("could not produce a TorchScript archive: " + "; ".join(errors))


def _reference(signature: Signature, reference: Inputs | None) -> bytes | None:
    if reference is None:
        return None
    if not isinstance(reference, Mapping):
        if len(signature.inputs) != 1:
            raise InvalidInput("the model takes several inputs: give the reference as a dict")
        reference = {signature.inputs[0].name: reference}
    try:
        arrays = validate_inputs(signature, reference)
    except InvalidInput as exc:
        raise InvalidInput(f"reference sample: {exc.message}") from None
    return encode_arrays(dict(zip(signature.input_names, arrays, strict=True)))


def package(
    model: torch.nn.Module,
    example_inputs: Inputs | torch.Tensor | tuple[torch.Tensor, ...],
    *,
    formats: Sequence[str] = FORMATS,
    task: Task | None = None,
    labels: Sequence[str] | None = None,
    reference: Inputs | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> Package:
    """Export ``model`` to TorchScript and every other format asked for, each checked
    against the eager model on the example inputs (at two batch sizes).

    TorchScript is always produced (it is the trainable form): ``torch.jit.script``,
    falling back to ``torch.jit.trace``; ``Package.details["torchscript_method"]`` says
    which. A derived format that fails export or parity is reported, not recorded.
    The model runs in eval mode; its training flag is restored afterwards.
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    wanted = _check_formats(formats)
    if atol < 0 or rtol < 0:
        raise InvalidInput("atol and rtol must not be negative")
    was_training = model.training
    model.eval()
    try:
        inputs = normalize_examples(model, example_inputs, input_names)
        found = probe(model, inputs, output_names=output_names, task=task, labels=labels)
        reference_blob = _reference(found.signature, reference)
        deriver = Deriver(model, found, atol, rtol)
        torchscript, ts_report = _torchscript(model, deriver)
        blobs = {"torchscript": torchscript}
        reports = [ts_report]
        for format in wanted:
            if format == "torchscript":
                continue
            data, report = deriver.derive(format)
            reports.append(report)
            if data is not None:
                blobs[format] = data
        blobs["weights"] = encode_state_dict(model)
        blobs["example"] = encode_arrays(found.cases[0][0])
        if reference_blob is not None:
            blobs["reference"] = reference_blob
    finally:
        model.train(was_training)
    details = {
        "torchscript_method": ts_report.details["method"],
        "torch_version": torch.__version__.split("+")[0],
        "atol": atol,
        "rtol": rtol,
    }
    return Package(found.signature, blobs, reports, details)


def package_torchscript(
    path: str | Path,
    example_inputs: Inputs | torch.Tensor | tuple[torch.Tensor, ...],
    **kwargs: Any,
) -> Package:
    """``package`` for a TorchScript archive on disk (the CLI's MODEL_FILE).

    A file that is not a TorchScript archive (a pickle, a ``torch.save`` file, random
    bytes) raises ``InvalidInput`` and is never unpickled.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read model file {str(path)!r}: {exc.strerror}") from None
    return package(load_torchscript(data), example_inputs, **kwargs)


def export_format(
    torchscript: bytes,
    signature: Signature,
    example: Mapping[str, Array],
    format: str,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> tuple[bytes | None, ExportReport]:
    """Derive ``format`` from a stored TorchScript archive, checked against that archive
    on ``example``. Returns the bytes (None when export or parity failed) and the report;
    bad arguments (not TorchScript, an example that does not fit) raise ``InvalidInput``.
    """
    _check_formats([format])
    module = load_torchscript(torchscript)
    arrays = validate_inputs(signature, example)
    inputs = {
        n: torch.from_numpy(np.array(a)) for n, a in zip(signature.input_names, arrays, strict=True)
    }
    found = probe(
        module,
        inputs,
        output_names=signature.output_names,
        task=signature.task,
        labels=signature.labels,
    )
    if [(s.name, s.dtype, len(s.shape)) for s in found.signature.outputs] != [
        (s.name, s.dtype, len(s.shape)) for s in signature.outputs
    ]:
        raise InvalidInput("the TorchScript archive's outputs do not match the signature")
    found = Probe(signature, found.cases)
    deriver = Deriver(module, found, atol, rtol)
    if format == "torchscript":
        data, report = deriver.attempt("torchscript", lambda: bytes(torchscript))
        report.details["method"] = "given"
        return data, report
    return deriver.derive(format)
