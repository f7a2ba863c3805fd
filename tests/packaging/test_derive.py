"""The Deriver: a format whose outputs disagree with eager is reported, not returned."""

from __future__ import annotations

import torch

from torchops.packaging.derive import Deriver
from torchops.packaging.signature import Probe, normalize_examples, probe


def _probe(model: torch.nn.Module) -> Probe:
    return probe(model, normalize_examples(model, torch.randn(4, 3)))


def test_matching_format_is_returned_with_its_figures() -> None:
    model = torch.nn.Linear(3, 2).eval()
    data, report = Deriver(model, _probe(model), atol=1e-4, rtol=1e-3).derive("exported")
    assert data is not None
    assert report.ok and report.error is None
    assert report.max_abs_diff == 0.0
    assert report.details["bytes"] == len(data)


def test_parity_failure_is_reported_and_the_bytes_withheld() -> None:
    model = torch.nn.Linear(3, 2).eval()
    found = _probe(model)
    shifted = Probe(
        found.signature,
        tuple((inputs, [out + 0.5 for out in outputs]) for inputs, outputs in found.cases),
    )
    data, report = Deriver(model, shifted, atol=1e-4, rtol=1e-3).derive("onnx")
    assert data is None
    assert not report.ok
    assert report.error is not None and report.error.startswith("parity with eager failed")
    assert report.max_abs_diff is not None and abs(report.max_abs_diff - 0.5) < 1e-4


def test_export_error_is_reported_with_its_cause() -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x
            return -x

    model = Broken()
    data, report = Deriver(model, _probe(model), atol=1e-4, rtol=1e-3).derive("exported")
    assert data is None
    assert not report.ok
    assert report.error is not None and "data-dependent" in report.error
    assert report.seconds > 0
