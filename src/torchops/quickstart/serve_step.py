"""The quickstart's serving step: the real server, real requests, latency and throughput.

``serve_step`` starts ``python -m torchops.serving`` on a loopback socket the quickstart
binds itself (port 0: the kernel picks a free port, and nothing can take it in between),
waits for ``/v2/health/ready``, sends every test image as an Open Inference Protocol
request — first one at a time, then many at once — and checks each answer against the
trained model's own prediction. The server keeps running for the later steps
(``ctx.server_url``, ``ctx.token``); ``QuickstartContext.close`` stops it.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from torchops.config import Settings
from torchops.errors import TorchopsError, Unavailable
from torchops.types import Array, ModelVersion

if TYPE_CHECKING:
    import httpx

    from torchops.quickstart.steps import QuickstartContext

__all__ = ["PhaseResult", "ServerProcess", "serve_step"]

#: requests sent one after the other (latency), then the rest of the test set at once
SEQUENTIAL_REQUESTS = 100
CONCURRENCY = 8
READY_TIMEOUT_S = 120.0
#: the quickstart's server publishes monitoring snapshots (and evaluates alerts) every
#: second rather than every 10 s, so that the monitoring step does not sit waiting
SERVER_OPTIONS = ("--snapshot-interval", "1")


class ServerProcess:
    """``python -m torchops.serving`` in a child process, on a socket this process bound."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        settings: Settings,
        refs: Sequence[str],
        *,
        log_path: Path,
        threads: int = 1,
        options: Sequence[str] = (),
    ) -> ServerProcess:
        """Start serving ``refs`` from ``settings``' registry on a free loopback port.

        ``options`` are more ``torchops serve`` options; the child's output goes to
        ``log_path``.
        """
        from torchops.serving.server import bind

        env = dict(os.environ)  # the settings, not stale variables, say what to serve
        for f in fields(settings):
            value, name = getattr(settings, f.name), f"TORCHOPS_{f.name.upper()}"
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sock = bind("127.0.0.1", 0)
        try:
            fd = sock.fileno()
            command = [sys.executable, "-m", "torchops.serving", *refs]
            command += ["--listen-fd", str(fd), "--threads", str(threads), *options]
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(fd,),
                )
            port = sock.getsockname()[1]
        finally:
            sock.close()  # the child has its own copy; ours would keep a dead server's port
        return cls(process, f"http://127.0.0.1:{port}", log_path)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, client: httpx.Client, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll ``/v2/health/ready`` until it answers 200; raise if the server dies or hangs."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if not self.running:
                raise Unavailable(
                    f"the server exited with code {self.process.returncode} before it was "
                    f"ready; its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the server was not ready after {timeout_s:.0f} s; its log "
                    f"({self.log_path}) ends with:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the server drains what is in flight), wait, SIGKILL if it hangs."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.process.returncode}"
        return f"ServerProcess(url={self.url!r}, pid={self.process.pid}, {state})"


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """What one round of requests measured, as the client saw it (plus the server's batches)."""

    name: str
    concurrency: int
    requests: int
    errors: int
    #: answers whose scores equal the trained model's own (offline) scores
    agree: int
    #: answers whose top class is the true label
    correct: int
    latencies_s: tuple[float, ...]
    seconds: float
    #: rows per batch the server ran, from its /metrics (None if it was not readable)
    mean_batch: float | None
    #: mean seconds the server spent on a request, receipt to answer, from its /metrics
    server_s: float | None
    first_error: str | None

    @property
    def accuracy(self) -> float:
        return self.correct / self.requests if self.requests else math.nan

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else math.nan

    def latency_s(self, quantile: float) -> float:
        if not self.latencies_s:
            return math.nan
        return float(np.quantile(np.asarray(self.latencies_s), quantile))


def serve_step(ctx: QuickstartContext) -> None:
    import httpx
    import torch

    from torchops.serving.auth import load_token

    data, model = ctx.trained()
    mv = ctx.registered()
    with torch.inference_mode():
        offline = model.eval()(torch.from_numpy(data.x_test)).numpy()
    token, token_path = load_token(ctx.settings)  # the server reads the same token
    log_path = ctx.settings.home / "logs" / f"quickstart-serve-{ctx.run_id}.log"
    start = time.perf_counter()
    ctx.server = server = ServerProcess.start(
        ctx.settings, [mv.name], log_path=log_path, options=SERVER_OPTIONS
    )
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    # trust_env=False: a proxy from the environment has no business with loopback
    with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False, limits=limits) as c:
        server.wait_ready(c)
        ctx.server_url, ctx.token = server.url, token
        where = f"in {token_path}" if token_path is not None else "from TORCHOPS_TOKEN"
        ctx.console.print(
            f"server ready at [bold]{escape(server.url)}[/] in "
            f"{time.perf_counter() - start:.1f} s (pid {server.process.pid}); "
            f"management token {escape(where)}"
        )
        sender = _Sender(c, mv, data.x_test, offline, data.y_test, f"qs-{ctx.run_id}-serve")
        n = len(data.x_test)
        split = min(SEQUENTIAL_REQUESTS, n)
        plan = [
            ("one at a time", 1, range(split)),
            (f"{CONCURRENCY} at once", CONCURRENCY, range(split, n)),
        ]
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            console=ctx.console,
        )
        with progress:
            task = progress.add_task("requests", total=n)
            for name, concurrency, rows in plan:
                if len(rows):
                    progress.update(task, description=f"requests, {name}")
                    advance = functools.partial(progress.advance, task)
                    ctx.serve_results.append(sender.phase(name, concurrency, rows, advance))
    ctx.console.print(_table(ctx.serve_results))
    _check(ctx.serve_results)
    results = ctx.serve_results
    accuracy = sum(r.correct for r in results) / sum(r.requests for r in results)
    ctx.console.print(
        f"every answer matches the trained model's own: accuracy {accuracy:.4f} over all "
        f"{sum(r.requests for r in results)} test images (offline: "
        f"{ctx.metrics.get('accuracy', math.nan):.4f}); the server keeps running for the "
        "next steps"
    )


class _Sender:
    """Sends test images to the server as single-row OIP infer requests and checks the answers."""

    def __init__(
        self,
        client: httpx.Client,
        mv: ModelVersion,
        x: Array,
        offline: Array,
        labels: Array,
        id_prefix: str,
    ) -> None:
        from torchops.serving.datatypes import datatype_of

        spec = mv.signature.inputs[0]
        self.client = client
        self.model = mv.name
        self.path = f"/v2/models/{mv.name}/infer"
        self.input_name = spec.name
        self.datatype = datatype_of(spec.dtype)
        self.output = mv.signature.outputs[0].name
        self.x, self.offline, self.labels = x, offline, labels
        self.id_prefix = id_prefix  # request ids unique across quickstart runs

    def phase(
        self, name: str, concurrency: int, rows: range, advance: Callable[[], None]
    ) -> PhaseResult:
        def one(i: int) -> tuple[int, float, Array | None, str | None]:
            outcome = self._infer(i)
            advance()
            return outcome

        before = self._counters()
        start = time.perf_counter()
        if concurrency == 1:
            outcomes = [one(i) for i in rows]
        else:
            with ThreadPoolExecutor(concurrency, thread_name_prefix="quickstart-client") as pool:
                outcomes = list(pool.map(one, rows))
        seconds = time.perf_counter() - start
        after = self._counters()
        answered = [(i, t, scores) for i, t, scores, _ in outcomes if scores is not None]
        errors = [error for *_, error in outcomes if error is not None]
        mean_batch = server_s = None
        if before is not None and after is not None:
            rows_run, batches, busy_s, requests = (
                b - a for a, b in zip(before, after, strict=True)
            )
            mean_batch = rows_run / batches if batches > 0 else None
            server_s = busy_s / requests if requests > 0 else None
        return PhaseResult(
            name=name,
            concurrency=concurrency,
            requests=len(outcomes),
            errors=len(errors),
            agree=sum(
                bool(np.allclose(s, self.offline[i], rtol=1e-4, atol=1e-4)) for i, _, s in answered
            ),
            correct=sum(int(np.argmax(s)) == int(self.labels[i]) for i, _, s in answered),
            latencies_s=tuple(t for _, t, _ in answered),
            seconds=seconds,
            mean_batch=mean_batch,
            server_s=server_s,
            first_error=errors[0] if errors else None,
        )

    def _infer(self, i: int) -> tuple[int, float, Array | None, str | None]:
        import httpx
        import orjson

        body = orjson.dumps(
            {
                "id": f"{self.id_prefix}-{i}",
                "inputs": [
                    {
                        "name": self.input_name,
                        "shape": [1, self.x.shape[1]],
                        "datatype": self.datatype,
                        "data": self.x[i].tolist(),
                    }
                ],
            }
        )
        headers = {"Content-Type": "application/json"}
        start = time.perf_counter()
        try:
            response = self.client.post(self.path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return i, time.perf_counter() - start, None, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            return i, elapsed, None, f"HTTP {response.status_code}: {response.text[:200]}"
        try:
            outputs = {o["name"]: o for o in orjson.loads(response.content)["outputs"]}
            scores = np.asarray(outputs[self.output]["data"], dtype=np.float64)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return i, elapsed, None, f"unreadable answer ({exc}): {response.text[:200]}"
        return i, elapsed, scores, None

    def _counters(self) -> tuple[float, float, float, float] | None:
        """This model's (rows, batches, request seconds, requests) so far, from ``/metrics``."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = self.client.get("/metrics").text
        except httpx.HTTPError:
            return None
        totals = dict.fromkeys(_COUNTERS, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals and sample.labels.get("model") == self.model:
                    totals[sample.name] += sample.value
        rows, batches, seconds, requests = totals.values()
        return rows, batches, seconds, requests


_COUNTERS = (
    "torchops_batch_size_sum",
    "torchops_batch_size_count",
    "torchops_request_duration_seconds_sum",
    "torchops_request_duration_seconds_count",
)


def _table(results: Sequence[PhaseResult]) -> Table:
    table = Table(
        title="Inference over HTTP (Open Inference Protocol v2, JSON)",
        title_justify="left",
        caption="latency: as this Python client measures it, its own time included; "
        "server time: from the server's /metrics",
        caption_justify="left",
    )
    table.add_column("")
    for r in results:
        table.add_column(f"{r.name}", justify="right")

    def row(label: str, cell: Callable[[PhaseResult], str]) -> None:
        table.add_row(label, *(cell(r) for r in results))

    def ms(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value * 1000:.2f} ms"

    row("requests", lambda r: str(r.requests))
    row("errors", lambda r: str(r.errors))
    row("same scores as offline", lambda r: f"{r.agree}/{r.requests}")
    row("accuracy", lambda r: f"{r.accuracy:.4f}")
    row("latency p50", lambda r: ms(r.latency_s(0.5)))
    row("latency p99", lambda r: ms(r.latency_s(0.99)))
    row("server time per request", lambda r: ms(r.server_s))
    row("requests/s", lambda r: f"{r.requests_per_s:,.0f}")
    row("mean batch (server)", lambda r: "-" if r.mean_batch is None else f"{r.mean_batch:.2f}")
    return table


def _check(results: Sequence[PhaseResult]) -> None:
    errors = sum(r.errors for r in results)
    total = sum(r.requests for r in results)
    if errors:
        first = next(r.first_error for r in results if r.first_error is not None)
        raise TorchopsError(f"{errors} of {total} requests failed; the first: {first}")
    differ = total - sum(r.agree for r in results)
    if differ:
        raise TorchopsError(
            f"{differ} of {total} answers differ from the trained model's own predictions"
        )
