"""The monitoring report, built from a real registry filled as a server's monitor fills it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

from torchops.errors import InvalidInput, NotFound
from torchops.monitoring.alerts import AlertEvaluator, AlertRule, AlertStore
from torchops.monitoring.feedback import FeedbackStore
from torchops.monitoring.observations import Observation, ObservationWriter
from torchops.monitoring.report import build_report
from torchops.monitoring.report_html import render_html, write_html
from torchops.monitoring.snapshots import SnapshotStore
from torchops.registry import Registry
from torchops.registry.store import utcnow

from ._seeded import digits, register_digits, serve


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "home") as registry:
        yield registry


def test_quality_matches_sklearn_cumulative_and_over_the_recent_window(
    registry: Registry,
) -> None:
    data = digits()
    mv = register_digits(registry)
    clean = serve(registry, mv.version, data.x_test[:300], data.y_test[:300], prefix="c")
    start = clean.times[-1] + timedelta(seconds=2)
    shifted = serve(
        registry, mv.version, 1.0 - data.x_test[:150], data.y_test[:150], prefix="s", start=start
    )
    report = build_report(registry, "digits", window=200)

    y_true = np.concatenate([clean.y_true, shifted.y_true])
    y_pred = np.concatenate([clean.y_pred, shifted.y_pred])
    assert report.observations == report.labelled == 450
    cumulative = report.cumulative.metrics
    assert cumulative["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert cumulative["f1_macro"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    recent = report.recent.metrics
    assert report.recent.window == "last_200" and report.recent.count == 200
    assert recent["accuracy"] == pytest.approx(accuracy_score(y_true[-200:], y_pred[-200:]))
    # the inverted digits are mostly misclassified: the recent window shows the drop
    assert accuracy_score(clean.y_true, clean.y_pred) > 0.9
    assert recent["accuracy"] < cumulative["accuracy"] - 0.2
    confusion = np.asarray(report.recent.confusion)
    assert confusion.shape == (10, 10) and confusion.sum() == 200
    assert np.trace(confusion) == round(recent["accuracy"] * 200)


def test_drift_is_flagged_on_shifted_inputs_and_not_on_clean_ones(registry: Registry) -> None:
    data = digits()
    mv = register_digits(registry)
    clean = serve(registry, mv.version, data.x_test[:300], data.y_test[:300], prefix="c")

    calm = build_report(registry, "digits", window=200)
    assert calm.drift is not None and calm.drift_note is None
    assert calm.drift.rows == 200
    assert not calm.drift.dataset_drifted
    assert calm.drift.drifted_share < 0.2

    start = clean.times[-1] + timedelta(seconds=2)
    serve(registry, mv.version, 1.0 - data.x_test[:200], data.y_test[:200], prefix="s", start=start)
    shifted = build_report(registry, "digits", window=200)
    assert shifted.drift is not None
    assert shifted.drift.rows == 200  # the most recent rows: all inverted
    assert shifted.drift.dataset_drifted
    assert shifted.drift.drifted_share > 0.5
    assert shifted.drift.prediction is not None and shifted.drift.prediction.drifted
    # a wider drift window mixes clean rows back in
    mixed = build_report(registry, "digits", window=200, drift_window=500)
    assert mixed.drift is not None and mixed.drift.rows == 500


def test_trends_come_from_snapshots_when_the_monitor_wrote_them(registry: Registry) -> None:
    data = digits()
    mv = register_digits(registry)
    serve(registry, mv.version, data.x_test[:120], data.y_test[:120], prefix="c")

    computed = build_report(registry, "digits", window=50)
    assert computed.trend_source == "labelled"
    assert len(computed.trends["accuracy"]) >= 2

    snapshots = SnapshotStore(registry.engine)
    base = utcnow() - timedelta(minutes=10)
    values = [0.97, 0.96, 0.91, 0.72]
    for i, accuracy in enumerate(values):
        at = base + timedelta(minutes=i)
        snapshots.write("digits", mv.version, "quality", "cumulative", {"accuracy": 0.5}, at=at)
        snapshots.write("digits", mv.version, "quality", "last_n", {"accuracy": accuracy}, at=at)
        snapshots.write("digits", mv.version, "drift", "last_500", {"drifted_share": i / 4}, at=at)
    report = build_report(registry, "digits", window=50)
    assert report.trend_source == "snapshots:last_n"
    assert [p.value for p in report.trends["accuracy"]] == values
    assert [p.value for p in report.drift_trend] == [0.0, 0.25, 0.5, 0.75]


def test_alert_rules_active_and_recent_events_are_reported(registry: Registry) -> None:
    mv = register_digits(registry)
    alerts = AlertStore(registry.engine)
    alerts.add_rule(AlertRule("digits", "low-accuracy", "accuracy", "<", 0.9, min_samples=10))
    alerts.add_rule(AlertRule("digits", "drifting", "drift_share", ">=", 0.5, min_samples=10))
    evaluator = AlertEvaluator(alerts)
    evaluator.evaluate("digits", mv.version, {"accuracy": 0.7, "drift_share": 0.8}, 50)
    evaluator.evaluate("digits", mv.version, {"accuracy": 0.6, "drift_share": 0.1}, 50)

    report = build_report(registry, "digits")
    assert [r.name for r in report.rules] == ["drifting", "low-accuracy"]
    assert [(e.rule, e.state) for e in report.active] == [("low-accuracy", "firing")]
    assert [(e.rule, e.state) for e in report.events] == [
        ("drifting", "resolved"),
        ("low-accuracy", "firing"),
        ("drifting", "firing"),
    ]


def test_only_labelled_predictions_of_the_version_count(registry: Registry) -> None:
    data = digits()
    first = register_digits(registry)
    second = register_digits(registry)
    serve(registry, first.version, data.x_test[:40], data.y_test[:40], prefix="a")
    serve(registry, second.version, data.x_test[:60], data.y_test[:60], prefix="b")
    serve(registry, second.version, data.x_test[:25], data.y_test[:25], prefix="u", feedback=False)

    report = build_report(registry, "digits:2")
    assert (report.version, report.observations, report.labelled) == (2, 85, 60)
    assert report.cumulative.count == 60
    older = build_report(registry, "digits:1")
    assert (older.observations, older.labelled) == (40, 40)


def test_a_version_without_reference_profile_or_labels_says_why(registry: Registry) -> None:
    data = digits()
    mv = register_digits(registry, reference=False)
    serve(registry, mv.version, data.x_test[:40], data.y_test[:40], prefix="c", feedback=False)
    report = build_report(registry, "digits")
    assert report.drift is None
    assert report.drift_note is not None and "reference" in report.drift_note
    assert report.labelled == 0 and report.cumulative.metrics == {"count": 0.0}
    assert report.trends == {}


def test_too_few_rows_for_a_drift_verdict(registry: Registry) -> None:
    data = digits()
    mv = register_digits(registry)
    serve(registry, mv.version, data.x_test[:10], data.y_test[:10], prefix="c")
    report = build_report(registry, "digits")
    assert report.drift is not None and report.drift.features == ()
    assert report.drift_note is not None and "at least 30" in report.drift_note


def test_regression_quality_matches_sklearn(registry: Registry) -> None:
    torch.manual_seed(0)
    mv = registry.register(
        "reg", torch.nn.Linear(4, 2), torch.zeros(2, 4), formats=("torchscript",), task="regression"
    )
    rng = np.random.default_rng(0)
    predicted, truth = rng.normal(size=(30, 2)), rng.normal(size=(30, 2))
    writer = ObservationWriter(registry.engine)
    for i in range(30):
        writer.put(
            Observation(
                f"r{i}",
                "reg",
                mv.version,
                utcnow() - timedelta(seconds=60 - i),
                0.001,
                {"output": predicted[i : i + 1].astype(np.float32)},
                None,
                predicted[i].tolist(),
                None,
            )
        )
    writer.close()
    FeedbackStore(registry.engine).add_many(
        "reg", [(f"r{i}", truth[i].tolist()) for i in range(30)]
    )
    report = build_report(registry, "reg", window=10)
    assert report.key_metrics == ("mse", "rmse", "mae")
    assert report.cumulative.metrics["mse"] == pytest.approx(mean_squared_error(truth, predicted))
    assert report.recent.metrics["mae"] == pytest.approx(
        mean_absolute_error(truth[-10:], predicted[-10:])
    )
    assert report.cumulative.confusion is None


def test_bad_arguments_and_unknown_models(registry: Registry) -> None:
    register_digits(registry)
    with pytest.raises(InvalidInput, match="window"):
        build_report(registry, "digits", window=0)
    with pytest.raises(InvalidInput, match="drift_window"):
        build_report(registry, "digits", drift_window=-1)
    with pytest.raises(NotFound):
        build_report(registry, "nope")


def test_to_dict_is_strict_json(registry: Registry) -> None:
    data = digits()
    mv = register_digits(registry)
    serve(registry, mv.version, 1.0 - data.x_test[:60], data.y_test[:60], prefix="s")
    report = build_report(registry, "digits", window=30)
    encoded = json.dumps(report.to_dict(), allow_nan=False)
    decoded = json.loads(encoded)
    assert decoded["model"] == "digits" and decoded["labelled"] == 60
    assert decoded["quality"][1]["window"] == "last_30"
    assert decoded["drift"]["dataset_drifted"] is True


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]


def test_html_report_is_self_contained_with_every_section(
    registry: Registry, tmp_path: Path
) -> None:
    data = digits()
    mv = register_digits(registry)
    clean = serve(registry, mv.version, data.x_test[:200], data.y_test[:200], prefix="c")
    start = clean.times[-1] + timedelta(seconds=2)
    serve(registry, mv.version, 1.0 - data.x_test[:100], data.y_test[:100], prefix="s", start=start)
    alerts = AlertStore(registry.engine)
    alerts.add_rule(AlertRule("digits", "low-accuracy", "accuracy", "<", 0.9))
    alerts.add_rule(AlertRule("digits", "class-3", "f1[<3>]", "<", 0.5))
    report = build_report(registry, "digits", window=100)
    path = tmp_path / "report.html"
    write_html(report, path)
    page = path.read_text(encoding="utf-8")
    assert page == render_html(report)

    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "link" not in parser.tags and "img" not in parser.tags
    assert [link for link in parser.links if re.match(r"\s*(https?:)?//", link)] == []
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)  # nothing fetched by CSS
    for heading in ("<h2>Quality</h2>", "<h2>Drift</h2>", "<h2>Alerts</h2>"):
        assert heading in page
    for chart in ("confusion matrix", "metric over time", "PSI per feature"):
        assert f"<title>{chart}</title>" in page
    assert parser.tags.count("svg") >= 3
    assert "dataset drift" in page and "low-accuracy" in page
    assert "f1[&lt;3&gt;]" in page and "<3>" not in page  # text is escaped
