"""``torchops quickstart``: train a digits classifier, register it, promote it.

The quickstart is a sequence of ``Step`` functions sharing a ``QuickstartContext``;
``run_quickstart`` runs ``STEPS`` in order.
"""

from __future__ import annotations

from torchops.quickstart.steps import (
    STEPS,
    QuickstartConfig,
    QuickstartContext,
    Step,
    run_quickstart,
)

__all__ = ["STEPS", "QuickstartConfig", "QuickstartContext", "Step", "run_quickstart"]
