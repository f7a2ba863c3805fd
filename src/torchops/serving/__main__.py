"""``python -m torchops.serving [REF]... [options]``: the same as ``torchops serve``."""

from __future__ import annotations

import typer

from torchops.cli.serve import serve

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(serve)

if __name__ == "__main__":
    app(prog_name="python -m torchops.serving")
