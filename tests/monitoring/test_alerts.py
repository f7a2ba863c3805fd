from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Engine

from torchops.errors import Conflict, InvalidInput, NotFound
from torchops.monitoring.alerts import AlertEvaluator, AlertRule, AlertStore


class Receiver:
    """A real HTTP server on a loopback ephemeral port that keeps the JSON it is sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        received, arrived = self.received, self.arrived

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with arrived:
                    received.append(json.loads(body))
                    arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


def _accuracy_rule(**changes: Any) -> AlertRule:
    fields: dict[str, Any] = {
        "model": "clf",
        "name": "low-accuracy",
        "metric": "accuracy",
        "op": "<",
        "threshold": 0.8,
        "window": 200,
        "min_samples": 10,
    }
    return AlertRule(**{**fields, **changes})


def test_rule_fires_once_and_resolves_once_with_a_webhook(
    engine: Engine, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    alerts = AlertStore(engine)
    alerts.add_rule(_accuracy_rule())
    evaluator = AlertEvaluator(alerts, webhook_url=receiver.url)
    caplog.set_level(logging.INFO, logger="torchops.alerts")
    # too few samples: no verdict yet
    assert evaluator.evaluate("clf", 1, {"accuracy": 0.5}, samples=5) == []
    fired = evaluator.evaluate("clf", 1, {"accuracy": 0.5}, samples=20)
    assert [(e.rule, e.state, e.value, e.version) for e in fired] == [
        ("low-accuracy", "firing", 0.5, 1)
    ]
    assert "accuracy = 0.5 < 0.8" in fired[0].message
    # still holds: no repeat
    assert evaluator.evaluate("clf", 1, {"accuracy": 0.4}, samples=30) == []
    assert [e.id for e in alerts.active("clf")] == [fired[0].id]
    # a metric the values do not carry leaves the state alone
    assert evaluator.evaluate("clf", 1, {"f1_macro": 0.9}, samples=40) == []
    resolved = evaluator.evaluate("clf", 1, {"accuracy": 0.9}, samples=40)
    assert [(e.state, e.value) for e in resolved] == [("resolved", 0.9)]
    assert evaluator.evaluate("clf", 1, {"accuracy": 0.95}, samples=50) == []
    assert alerts.active("clf") == []
    evaluator.close()
    assert [(p["state"], p["rule"], p["model"], p["version"]) for p in receiver.received] == [
        ("firing", "low-accuracy", "clf", 1),
        ("resolved", "low-accuracy", "clf", 1),
    ]
    assert [e.state for e in alerts.events("clf")] == ["resolved", "firing"]
    logged = [r for r in caplog.records if r.name == "torchops.alerts"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.INFO]


def test_firing_state_survives_a_restart(engine: Engine) -> None:
    AlertStore(engine).add_rule(_accuracy_rule(min_samples=0))
    first = AlertEvaluator(AlertStore(engine))
    assert len(first.evaluate("clf", 1, {"accuracy": 0.1}, samples=1)) == 1
    # a new evaluator (another process, or after a restart) does not fire again
    again = AlertEvaluator(AlertStore(engine))
    assert again.evaluate("clf", 1, {"accuracy": 0.1}, samples=1) == []
    assert [e.state for e in again.evaluate("clf", 1, {"accuracy": 0.9}, samples=1)] == ["resolved"]
    # and a stale evaluator cannot record the same transition twice
    rule = AlertStore(engine).rules("clf")[0]
    assert AlertStore(engine).transition(rule, 1, "resolved", 0.9, "again") is None


def test_versions_have_their_own_state(engine: Engine) -> None:
    alerts = AlertStore(engine)
    alerts.add_rule(_accuracy_rule(min_samples=1))
    alerts.add_rule(_accuracy_rule(name="drifting", metric="drift_share", op=">=", threshold=0.5))
    evaluator = AlertEvaluator(alerts)
    events = evaluator.evaluate("clf", 1, {"accuracy": 0.5, "drift_share": 0.75}, samples=10)
    assert sorted(e.rule for e in events) == ["drifting", "low-accuracy"]
    events = evaluator.evaluate("clf", 2, {"accuracy": 0.9, "drift_share": 0.75}, samples=10)
    assert [(e.rule, e.version) for e in events] == [("drifting", 2)]
    assert sorted((e.rule, e.version) for e in alerts.active("clf")) == [
        ("drifting", 1),
        ("drifting", 2),
        ("low-accuracy", 1),
    ]
    assert [e.version for e in alerts.events("clf", version=2)] == [2]
    assert len(alerts.events("clf", limit=2)) == 2


def test_a_failing_webhook_is_logged_not_raised(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    alerts = AlertStore(engine)
    alerts.add_rule(_accuracy_rule(min_samples=0))
    evaluator = AlertEvaluator(alerts, webhook_url=f"http://127.0.0.1:{port}/", timeout_s=1.0)
    caplog.set_level(logging.WARNING, logger="torchops.alerts")
    assert len(evaluator.evaluate("clf", 1, {"accuracy": 0.0}, samples=1)) == 1
    evaluator.close()
    assert any("webhook" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
    assert len(alerts.events("clf")) == 1


def test_rules_are_validated_listed_and_removed(engine: Engine) -> None:
    alerts = AlertStore(engine)
    with pytest.raises(InvalidInput, match="op"):
        _accuracy_rule(op="==")
    with pytest.raises(InvalidInput, match="threshold"):
        _accuracy_rule(threshold=float("nan"))
    with pytest.raises(InvalidInput, match="window"):
        _accuracy_rule(window=0)
    with pytest.raises(InvalidInput, match="min_samples"):
        _accuracy_rule(min_samples=-1)
    with pytest.raises(InvalidInput):
        _accuracy_rule(name="bad name!")
    rule = _accuracy_rule()
    alerts.add_rule(rule)
    with pytest.raises(Conflict, match="low-accuracy"):
        alerts.add_rule(_accuracy_rule(threshold=0.5))
    alerts.add_rule(_accuracy_rule(name="bad-rmse", metric="rmse", op=">", threshold=2))
    assert [r.name for r in alerts.rules("clf")] == ["bad-rmse", "low-accuracy"]
    assert alerts.rules("clf")[1] == rule
    assert alerts.rules("other") == []
    AlertEvaluator(alerts).evaluate("clf", 1, {"rmse": 3.0}, samples=100)
    alerts.remove_rule("clf", "bad-rmse")
    assert [r.name for r in alerts.rules("clf")] == ["low-accuracy"]
    assert alerts.events("clf") == []  # its events went with it
    with pytest.raises(NotFound):
        alerts.remove_rule("clf", "bad-rmse")
