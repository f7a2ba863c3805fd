"""Exporter noise is collected, not printed, and logging is put back afterwards."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from torchops.packaging._capture import captured


def test_warnings_logs_and_prints_are_collected(capfd: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("torch.onnx._internal.something")
    with captured() as messages:
        warnings.warn("first line\nsecond line", UserWarning, stacklevel=1)
        warnings.warn("old api", DeprecationWarning, stacklevel=1)
        logger.warning("graph %s", "changed")
        print("partial graph dump", file=sys.stderr)
        print("progress")
    assert messages == ["graph changed", "UserWarning: first line"]
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_handlers_and_propagation_are_restored() -> None:
    logger = logging.getLogger("torch.export")
    before = (list(logger.handlers), logger.propagate)
    with captured():
        assert logger.handlers != before[0]
    assert (list(logger.handlers), logger.propagate) == before
