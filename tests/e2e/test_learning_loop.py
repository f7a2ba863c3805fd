"""The whole loop on a real server: drifted traffic and feedback over HTTP, the embedded
learner (``serve --learn``) registers and promotes a new version, the server hot-swaps to
it and answers the drifted images better."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from rich.console import Console

from torchops.config import Settings
from torchops.learning.learner import SOURCE
from torchops.quickstart import QuickstartConfig, QuickstartContext
from torchops.quickstart.learn_step import run_learning, show_learning
from torchops.quickstart.train import fit_digits
from torchops.registry import Registry
from torchops.types import Array

from .conftest import StartServer

pytestmark = pytest.mark.slow

#: labels sent at most before the learner must have promoted a better version
BUDGET = 700
BATCH = 25


def register_digits(home: Path) -> tuple[Array, Array, Array, Array]:
    """``digits`` v1 in production (clean images); returns the stream and test sets."""
    data, model = fit_digits()
    with Registry(home) as registry:
        registry.register(
            "digits",
            model,
            data.x_test[:16],
            formats=("torchscript",),
            labels=data.labels,
            reference=data.x_train[:400],
        )
        registry.set_alias("digits", "production", 1)
    order = np.random.default_rng(0).permutation(len(data.x_train))
    inverted = (1.0 - data.x_train[order]).astype(np.float32)
    test = (1.0 - data.x_test).astype(np.float32)
    return inverted, data.y_train[order], test, data.y_test


def infer(client: httpx.Client, x: Array) -> dict[str, Any]:
    body = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    response = client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def predicted(answer: dict[str, Any]) -> Array:
    output = answer["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"]).argmax(axis=1)


def test_feedback_over_http_promotes_a_better_version_the_server_then_serves(
    tmp_path: Path, launch: StartServer
) -> None:
    home = tmp_path / "home"
    x, y, x_test, y_test = register_digits(home)
    server = launch(home, "--learn")
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.base, headers=headers, timeout=60) as client:
        before = infer(client, x_test)
        assert before["model_version"] == "1"
        accuracy_before = float(np.mean(predicted(before) == y_test))

        promoted = None
        sent = 0
        with Registry(home) as registry:
            while sent < BUDGET and promoted is None:
                answer = infer(client, x[sent : sent + BATCH])
                labels = [int(v) for v in y[sent : sent + BATCH]]
                given = client.post(
                    "/v2/models/digits/feedback", json={"id": answer["id"], "target": labels}
                )
                assert given.status_code == 200, given.text
                assert given.json()["accepted"] == BATCH
                sent += BATCH
                time.sleep(0.2)  # labels arrive after predictions, as they do
                production = registry.aliases("digits")[("digits", "production")]
                if production != 1:
                    promoted = production
            assert promoted is not None, f"no promotion after {sent} labels"
            mv = registry.get(f"digits:{promoted}")
            assert mv.source == SOURCE and mv.parent == 1
            assert mv.details["learner"]["window"]["labels"] > 0
            last = registry.history("digits", "production")[-1]
            assert last.actor == SOURCE and last.reason is not None
            assert "held-out labels" in last.reason

        # the server follows the alias: poll until it answers with the new version
        deadline = time.monotonic() + 60
        after = infer(client, x_test)
        while after["model_version"] == "1" and time.monotonic() < deadline:
            time.sleep(0.2)
            after = infer(client, x_test)
        assert after["model_version"] != "1"
        accuracy_after = float(np.mean(predicted(after) == y_test))
        assert accuracy_after > accuracy_before + 0.3, (accuracy_before, accuracy_after)


def test_quickstart_learn_step_recovers_accuracy_on_the_drift(
    tmp_path: Path, launch: StartServer
) -> None:
    home = tmp_path / "home"
    register_digits(home)
    server = launch(home)
    data, model = fit_digits()
    output = io.StringIO()
    ctx = QuickstartContext(
        settings=Settings.load(home=home),
        config=QuickstartConfig(),
        console=Console(file=output, width=120),
        run_id="e2e",
    )
    ctx.data, ctx.model = data, model
    ctx.version = ctx.registry.get("digits:1")
    ctx.server_url, ctx.token = server.base, server.token
    try:
        summary = run_learning(ctx)
        show_learning(ctx, summary)
    finally:
        ctx.close()
    assert summary.before_version == 1
    assert summary.after_version is not None and summary.after_version > 1
    assert summary.after_accuracy is not None
    assert summary.after_accuracy > summary.before_accuracy + 0.3
    assert summary.promotions
    assert all(p["gate_p_value"] < 0.05 for p in summary.promotions)
    assert summary.promotions[-1]["version"] == summary.after_version
    assert summary.promotions[-1]["accuracy"] == pytest.approx(summary.after_accuracy)
    text = output.getvalue()
    assert f"v{summary.after_version}" in text and "held-out inverted digits" in text
