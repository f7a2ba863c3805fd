"""Derive one format from a source module and check it against the eager outputs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchops.packaging import exporters
from torchops.packaging._capture import captured
from torchops.packaging.parity import compare
from torchops.packaging.signature import Probe
from torchops.runtime.loader import load_runtime

__all__ = ["Deriver", "ExportReport"]


@dataclass
class ExportReport:
    """How one format fared: exported and matching eager (``ok``), or why not (``error``)."""

    format: str
    ok: bool
    error: str | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "ok": self.ok,
            "error": self.error,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "seconds": self.seconds,
            "details": dict(self.details),
        }


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    line = text.splitlines()[0][:400] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    """The exception's first line, and its root cause's when it has one."""
    root = exc
    for _ in range(8):
        if root.__cause__ is None:
            break
        root = root.__cause__
    if root is exc:
        return _first_line(exc)
    return f"{_first_line(exc)} (caused by {_first_line(root)})"


class Deriver:
    """Derives formats from one source module and checks each against ``probe``."""

    def __init__(self, source: torch.nn.Module, found: Probe, atol: float, rtol: float):
        self.source = source
        self.probe = found
        self.atol = atol
        self.rtol = rtol
        # torch.export specialises a batch of 1, so export from at least two rows
        cases = found.cases
        rows = next(iter(cases[0][0].values())).shape[0]
        inputs = cases[0][0] if rows >= 2 else cases[1][0]
        self.args = tuple(torch.from_numpy(a) for a in inputs.values())
        self._program: torch.export.ExportedProgram | None = None
        self._program_error: str | None = None

    def check(self, format: str, data: bytes, report: ExportReport) -> bool:
        """Load ``data`` as a runtime and compare it with eager on every probe case."""
        signature = self.probe.signature
        runtime = load_runtime(format, data, signature, warmup=False)
        try:
            results = []
            for inputs, expected in self.probe.cases:
                out = runtime.predict_batch(inputs)
                names = signature.output_names
                results.append(
                    compare(
                        names, expected, [out[n] for n in names], atol=self.atol, rtol=self.rtol
                    )
                )
        finally:
            runtime.close()
        report.max_abs_diff = max(r.max_abs for r in results)
        report.max_rel_diff = max(r.max_rel for r in results)
        problems = [r.problem for r in results if r.problem]
        if problems:
            report.error = f"parity with eager failed: {problems[0]}"
        return not problems

    def attempt(self, format: str, build: Callable[[], bytes]) -> tuple[bytes | None, ExportReport]:
        """Build ``format``'s bytes and check them; failures become the report's error."""
        report = ExportReport(format=format, ok=False)
        start = time.perf_counter()
        data: bytes | None = None
        with captured() as messages:
            try:
                data = build()
                report.details["bytes"] = len(data)
                report.ok = self.check(format, data, report)
            except Exception as exc:  # any exporter failure is reported, not raised
                report.error = report.error or _one_line(exc)
        report.seconds = round(time.perf_counter() - start, 4)
        if messages:
            report.details["warnings"] = list(messages)
        return (data if report.ok else None), report

    def program(self) -> torch.export.ExportedProgram:
        if self._program is None:
            if self._program_error is not None:
                raise RuntimeError(self._program_error)
            try:
                self._program = exporters.export_program(self.source, self.args)
            except Exception as exc:
                self._program_error = f"torch.export failed: {_one_line(exc)}"
                raise
        return self._program

    def exported(self) -> tuple[bytes | None, ExportReport]:
        return self.attempt("exported", lambda: exporters.save_exported(self.program()))

    def onnx(self) -> tuple[bytes | None, ExportReport]:
        """ONNX from the torch.export program. There is no fallback to the dynamo
        exporter's own capture strategies: its draft export can bake one branch of
        data-dependent control flow into the graph, which parity on two batches may miss."""
        signature = self.probe.signature
        return self.attempt(
            "onnx",
            lambda: exporters.export_onnx(
                self.program(), signature.input_names, signature.output_names
            ),
        )

    def derive(self, format: str) -> tuple[bytes | None, ExportReport]:
        return self.exported() if format == "exported" else self.onnx()
