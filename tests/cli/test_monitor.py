"""``torchops monitor``: the terminal, JSON and HTML reports of a served digits model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from monitoring._seeded import digits, register_digits, serve
from torchops.cli.monitor import SPARKS, sparkline
from torchops.monitoring.alerts import AlertEvaluator, AlertRule, AlertStore
from torchops.monitoring.report import build_report
from torchops.registry import Registry

Cli = Callable[..., Result]


@pytest.fixture(scope="module")
def served_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits v1 after 200 clean and 100 inverted predictions, all labelled; one alert firing."""
    home = tmp_path_factory.mktemp("monitor") / "home"
    data = digits()
    with Registry(home) as registry:
        mv = register_digits(registry)
        registry.set_alias("digits", "production", mv.version)
        clean = serve(registry, mv.version, data.x_test[:200], data.y_test[:200], prefix="c")
        start = clean.times[-1] + timedelta(seconds=2)
        serve(
            registry, mv.version, 1 - data.x_test[:100], data.y_test[:100], prefix="s", start=start
        )
        alerts = AlertStore(registry.engine)
        alerts.add_rule(AlertRule("digits", "low-accuracy", "accuracy", "<", 0.9, min_samples=50))
        AlertEvaluator(alerts).evaluate("digits", mv.version, {"accuracy": 0.4}, 100)
    return home


def test_terminal_report_shows_quality_drift_and_alerts(cli: Cli, served_home: Path) -> None:
    result = cli("monitor", "digits", "--home", served_home, "--window", "100")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Quality of digits v1 on 300 labelled of 300 predictions" in out
    for metric in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "log_loss"):
        assert metric in out
    assert "last 100" in out
    assert any(c in out for c in SPARKS[:4]) and SPARKS[-1] in out  # a trend that moves
    assert "dataset DRIFT" in out and "Top 12 features by PSI" in out
    assert "Prediction drift: DRIFT" in out
    assert "low-accuracy" in out and "FIRING on v1" in out


def test_json_report_equals_the_python_report(cli: Cli, served_home: Path) -> None:
    result = cli("monitor", "digits", "--home", served_home, "--window", "100", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    with Registry(served_home) as registry:
        expected = build_report(registry, "digits", window=100).to_dict()
    for key in ("model", "version", "observations", "labelled", "quality", "drift", "rules"):
        assert data[key] == expected[key], key
    assert data["drift"]["dataset_drifted"] is True
    assert data["quality"][1]["metrics"]["accuracy"] < data["quality"][0]["metrics"]["accuracy"]


def test_html_option_writes_a_report_file(cli: Cli, served_home: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "digits.html"
    result = cli("monitor", "digits", "--home", served_home, "--html", target)
    assert result.exit_code == 0, result.stderr
    assert f"HTML report written to {target}" in result.stdout.replace("\n", "")
    page = target.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 3
    assert "<title>confusion matrix</title>" in page


def test_unknown_model_and_bad_window(cli: Cli, served_home: Path) -> None:
    missing = cli("monitor", "nope", "--home", served_home)
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: ") and "nope" in missing.stderr
    bad = cli("monitor", "digits", "--home", served_home, "--window", "0")
    assert bad.exit_code == 2


def test_a_model_without_traffic_still_reports(cli: Cli, tmp_path: Path) -> None:
    with Registry(tmp_path / "home") as registry:
        register_digits(registry)
    result = cli("monitor", "digits", "--home", tmp_path / "home")
    assert result.exit_code == 0, result.stderr
    assert "no labelled predictions yet" in result.stdout
    assert "no predictions of this version are stored yet" in result.stdout
    assert "no alert rules" in result.stdout.lower()


def test_the_installed_command_runs_in_a_subprocess(served_home: Path, tmp_path: Path) -> None:
    page = tmp_path / "r.html"
    command = [
        sys.executable, "-c", "from torchops.cli.main import main; main()",
        "monitor", "digits", "--home", str(served_home), "--json", "--html", str(page),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    assert data["html"] == str(page) and page.is_file()
    assert data["labelled"] == 300


def test_sparkline_scales_to_its_range_and_width() -> None:
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"
    assert sparkline([0.5, 0.5, 0.5]) == "▄▄▄"
    assert sparkline([]) == "" and sparkline([float("nan")]) == ""
    long = sparkline([float(i) for i in range(100)], width=20)
    assert len(long) == 20 and long[0] == "▁" and long[-1] == "█"
    assert list(long) == sorted(long)
