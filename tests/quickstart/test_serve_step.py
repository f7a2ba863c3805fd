"""The quickstart's serve step: a real server subprocess, real requests, a clean stop."""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from torchops.config import Settings
from torchops.quickstart import STEPS, QuickstartConfig, QuickstartContext, Step, run_quickstart


def test_the_quickstart_serves_its_model_and_stops_the_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    seen: list[QuickstartContext] = []
    during: dict[str, int] = {}

    def probe(ctx: QuickstartContext) -> None:
        """A later step: the server is still up, at ctx.server_url, with ctx.token."""
        seen.append(ctx)
        assert ctx.server_url is not None and ctx.token is not None
        with httpx.Client(base_url=ctx.server_url, trust_env=False) as client:
            during["ready"] = client.get("/v2/health/ready").status_code
            during["anonymous"] = client.post("/v2/repository/index").status_code
            auth = {"Authorization": f"Bearer {ctx.token}"}
            index = client.post("/v2/repository/index", headers=auth)
            during["authorized"] = index.status_code
            during["digits ready"] = sum(
                e["name"] == "digits" and e["state"] == "READY" for e in index.json()
            )

    def boom(ctx: QuickstartContext) -> None:
        raise RuntimeError("a later step failed")

    out = io.StringIO()
    serve_at = [s.name for s in STEPS].index("serve")
    steps = [*STEPS[: serve_at + 1], Step("probe", "Probe", probe), *STEPS[serve_at + 1 :]]
    with pytest.raises(RuntimeError, match="a later step failed"):
        run_quickstart(
            Settings(home=home),
            QuickstartConfig(epochs=3),
            console=Console(file=out, width=120),
            steps=[*steps, Step("boom", "Fail", boom)],
        )
    (ctx,) = seen
    assert during == {"ready": 200, "anonymous": 401, "authorized": 200, "digits ready": 1}
    assert ctx.token == (home / "token").read_text().strip()

    # every test image was sent and answered with the trained model's own scores
    data, _ = ctx.trained()
    results = ctx.serve_results
    assert [r.concurrency for r in results] == [1, 8]
    assert sum(r.requests for r in results) == len(data.x_test) == 450
    assert sum(r.errors for r in results) == 0
    assert all(r.agree == r.requests == len(r.latencies_s) for r in results)
    served_accuracy = sum(r.correct for r in results) / len(data.x_test)
    assert served_accuracy == pytest.approx(ctx.metrics["accuracy"], abs=1.5 / len(data.x_test))
    for r in results:
        assert r.mean_batch is not None and r.mean_batch >= 1
        assert r.server_s is not None and r.server_s > 0
        assert r.latency_s(0.5) <= r.latency_s(0.99)
    text = out.getvalue()
    assert "same scores as offline" in text and "350/350" in text and "100/100" in text

    # the failure in a later step still stopped the server: SIGTERM, a clean exit
    assert ctx.server is not None and ctx.server.process.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(ctx.server.process.pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{ctx.server_url}/v2/health/live", trust_env=False)
    assert "shutting down" in ctx.server.log_path.read_text()


def test_no_serve_skips_the_steps_that_need_the_server(tmp_path: Path) -> None:
    seen: list[QuickstartContext] = []
    out = io.StringIO()
    serve = next(s for s in STEPS if s.name == "serve")
    ctx = run_quickstart(
        Settings(home=tmp_path),
        QuickstartConfig(serve=False),
        console=Console(file=out, width=120),
        steps=[Step("probe", "Probe", seen.append), serve],
    )
    assert seen == [ctx] and ctx.server is None and ctx.server_url is None
    assert "1/1 Probe" in out.getvalue() and "Serve" not in out.getvalue()
    assert serve.needs_server
