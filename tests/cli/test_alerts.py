"""``torchops alerts``: list, add and remove a model's alert rules."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import Result

from torchops.monitoring.alerts import AlertEvaluator, AlertRule, AlertStore
from torchops.registry import Registry

Cli = Callable[..., Result]


def _rules(home: Path) -> list[AlertRule]:
    with Registry(home) as registry:
        return AlertStore(registry.engine).rules("tiny")


def test_add_list_and_remove_a_rule(cli: Cli, home: Path) -> None:
    added = cli(
        "alerts", "add", "tiny", "--metric", "accuracy", "--op", "<", "--threshold", "0.9",
        "--window", "200", "--min-samples", "50", "--home", home,
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    assert "accuracy-lt-0.9" in added.stdout
    assert _rules(home) == [AlertRule("tiny", "accuracy-lt-0.9", "accuracy", "<", 0.9, 200, 50)]

    listed = cli("alerts", "tiny", "--home", home)
    assert listed.exit_code == 0, listed.stderr
    assert "accuracy-lt-0.9" in listed.stdout and "accuracy < 0.9" in listed.stdout
    assert "last 200" in listed.stdout and "no alert events yet" in listed.stdout
    # ``alerts NAME`` is ``alerts list NAME``
    assert cli("alerts", "list", "tiny", "--home", home).stdout == listed.stdout

    removed = cli("alerts", "remove", "tiny", "accuracy-lt-0.9", "--home", home)
    assert removed.exit_code == 0, removed.stderr
    assert _rules(home) == []


def test_named_rule_and_json_listing_with_events(cli: Cli, home: Path) -> None:
    added = cli(
        "alerts", "add", "tiny", "--metric", "drift_share", "--op", ">=", "--threshold", "0.5",
        "--name", "inputs-drift", "--home", home, "--json",
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    assert json.loads(added.stdout)["name"] == "inputs-drift"
    with Registry(home) as registry:
        store = AlertStore(registry.engine)
        AlertEvaluator(store).evaluate("tiny", 1, {"drift_share": 0.75}, 100)
    listed = cli("alerts", "tiny", "--home", home, "--json")
    assert listed.exit_code == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["model"] == "tiny"
    assert [r["name"] for r in data["rules"]] == ["inputs-drift"]
    assert [(e["rule"], e["state"], e["value"]) for e in data["active"]] == [
        ("inputs-drift", "firing", 0.75)
    ]
    assert len(data["events"]) == 1
    table = cli("alerts", "tiny", "--home", home)
    assert "FIRING on v1" in table.stdout and "firing" in table.stdout


def test_refusals_change_nothing(cli: Cli, home: Path) -> None:
    base = ["alerts", "add", "tiny", "--threshold", "0.9", "--home", home]
    ok = cli(*base, "--metric", "f1[b]", "--op", "<")
    assert ok.exit_code == 0, ok.stderr
    before = _rules(home)

    duplicate = cli(*base, "--metric", "f1[b]", "--op", "<")
    assert duplicate.exit_code == 1 and "already has an alert rule" in duplicate.stderr
    bad_op = cli(*base, "--metric", "accuracy", "--op", "=<")
    assert bad_op.exit_code == 1 and "unknown --op '=<'" in bad_op.stderr
    typo = cli(*base, "--metric", "acuracy", "--op", "<")
    assert typo.exit_code == 1 and "unknown metric 'acuracy'" in typo.stderr
    assert "accuracy" in typo.stderr and "drift_share" in typo.stderr
    regression_metric = cli(*base, "--metric", "rmse", "--op", ">")
    assert regression_metric.exit_code == 1  # tiny is a classifier
    unknown_model = cli("alerts", "add", "nope", "--metric", "accuracy", "--op", "<",
                        "--threshold", "1", "--home", home)  # fmt: skip
    assert unknown_model.exit_code == 1 and "nope" in unknown_model.stderr
    bad_name = cli(*base, "--metric", "accuracy", "--op", "<", "--name", "no spaces")
    assert bad_name.exit_code == 1
    missing = cli("alerts", "remove", "tiny", "no-such-rule", "--home", home)
    assert missing.exit_code == 1 and "no alert rule named 'no-such-rule'" in missing.stderr
    assert _rules(home) == before


def test_listing_an_unknown_model_fails(cli: Cli, home: Path) -> None:
    result = cli("alerts", "nope", "--home", home)
    assert result.exit_code == 1 and result.stderr.startswith("error: ")


def test_no_arguments_prints_help(cli: Cli) -> None:
    result = cli("alerts")
    assert "add" in result.stdout and "remove" in result.stdout and "list" in result.stdout
