"""The ``torchops`` command line: ``app`` (typer) and ``main`` (the console script)."""

from __future__ import annotations

from torchops.cli.main import app, main

__all__ = ["app", "main"]
