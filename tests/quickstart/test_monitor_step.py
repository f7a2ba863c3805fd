"""The quickstart's monitoring step against the real server the serve step starts."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from torchops.config import Settings
from torchops.monitoring.alerts import AlertStore
from torchops.monitoring.report import build_report
from torchops.quickstart import STEPS, QuickstartConfig, QuickstartContext, Step, run_quickstart
from torchops.quickstart.monitor_step import MonitorSummary, run_monitoring, show_monitoring
from torchops.registry import Registry


def test_feedback_and_inverted_digits_show_drift_an_accuracy_drop_and_alerts(
    tmp_path: Path,
) -> None:
    seen: list[MonitorSummary] = []

    def monitor(ctx: QuickstartContext) -> None:
        summary = run_monitoring(ctx)
        seen.append(summary)
        show_monitoring(ctx, summary)

    wanted = ("train", "register", "promote", "serve")
    steps = [s for s in STEPS if s.name in wanted] + [Step("monitor", "Monitor", monitor, True)]
    out = io.StringIO()
    home = tmp_path / "home"
    ctx = run_quickstart(
        Settings(home=home),
        QuickstartConfig(epochs=8),
        console=Console(file=out, width=160),
        steps=steps,
    )
    (summary,) = seen
    clean, inverted = summary.phases
    n_test = len(ctx.trained()[0].x_test)
    assert (clean.rows, clean.accepted) == (n_test, n_test)
    assert inverted.accepted == inverted.rows >= 500

    # clean traffic: live accuracy is the offline test accuracy, and nothing drifts
    offline = ctx.metrics["accuracy"]
    assert abs(clean.window("last_n")["accuracy"] - offline) < 1e-9
    assert clean.window("cumulative")["count"] == n_test
    assert clean.drift is not None and not clean.drift["dataset_drifted"]
    # inverted digits: the labels show the drop, the inputs and predictions drift
    assert inverted.window("last_n")["accuracy"] < offline - 0.4
    assert inverted.drift is not None and inverted.drift["dataset_drifted"]
    assert inverted.drift["drifted_share"] > 0.5
    assert inverted.drift["prediction"]["drifted"]
    assert {e["rule"] for e in summary.fired} == {"quickstart-accuracy", "quickstart-drift"}

    text = out.getvalue()
    assert "inverted digits" in text and "DRIFT" in text and "most drifted pixels" in text
    assert "alert firing" in text and "monitor digits --home" in text

    # what the server stored is what ``torchops monitor`` reports afterwards
    with Registry(home) as registry:
        report = build_report(registry, "digits", window=200)
        assert report.labelled == n_test + inverted.rows
        assert report.recent.metrics["accuracy"] < offline - 0.4
        assert report.drift is not None and report.drift.dataset_drifted
        firing = {e.rule for e in AlertStore(registry.engine).active("digits")}
        assert firing == {"quickstart-accuracy", "quickstart-drift"}
