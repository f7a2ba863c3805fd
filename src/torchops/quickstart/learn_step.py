"""The quickstart's learning step: the served model learns the drift from feedback.

It needs the server the serve step started (``ctx.server_url``, ``ctx.token``) and runs
after the monitoring step, whose inverted digits made accuracy collapse:

1. measures the serving version on held-out inverted training digits (never labelled, so
   nothing trains on them), through the server;
2. sends other inverted digits as inference requests and their labels as feedback, in
   rounds of 50, while a ``Learner`` on the same registry (or the server's own, under
   ``serve --learn``) trains challengers every 50 labels, judges each on labels it never
   trained on, and promotes those significantly better than the champion;
3. waits until the server answers with the version now in production (it follows the
   alias) and measures it on the same held-out digits.

The table shows the accuracy of each version that served, when it was promoted and the
gate's numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from torchops.errors import Conflict, InvalidInput, Unavailable
from torchops.types import Array

if TYPE_CHECKING:
    import httpx

    from torchops.learning.learner import Learner
    from torchops.learning.referee import LearnerEvent
    from torchops.quickstart.steps import QuickstartContext

__all__ = ["LearnSummary", "learn_step", "run_learning", "show_learning"]

#: held-out inverted digits the versions are measured on (never labelled)
EVALUATION_SIZE = 300
#: rows per inference request and labels per round of feedback
ROUND = 50
#: labels sent (the first promotions come after about 150)
LABELS = 500
#: how long to wait for the labels of a round to reach the learner
LABEL_WAIT_S = 5.0
#: how long the server may take to answer with a newly promoted version
SWAP_TIMEOUT_S = 60.0


@dataclass
class LearnSummary:
    """What the learning step saw and did."""

    before_version: int
    before_accuracy: float
    after_version: int | None = None
    after_accuracy: float | None = None
    labels_sent: int = 0
    backlog: int = 0  # labels given before the step (the monitoring step's), learned first
    seconds: float = 0.0
    events: list[LearnerEvent] = field(default_factory=list)
    #: per promoted version: labels sent when it was promoted, its gate numbers and its
    #: accuracy on the held-out digits (computed offline from the registry)
    promotions: list[dict[str, Any]] = field(default_factory=list)


def learn_step(ctx: QuickstartContext) -> None:
    show_learning(ctx, run_learning(ctx))


def run_learning(ctx: QuickstartContext) -> LearnSummary:
    """Run the loop against ``ctx``'s server (see the module doc)."""
    import httpx

    from torchops.learning.learner import Learner

    url, token = ctx.server_url, ctx.token
    if not url or not token:
        raise Unavailable("the learning step needs the server the serve step starts")
    data, _ = ctx.trained()
    name = ctx.registered().name
    rng = np.random.default_rng(ctx.config.seed)
    order = rng.permutation(len(data.x_train))
    inverted = (1.0 - data.x_train[order]).astype(np.float32)
    labels = data.y_train[order]
    x_eval, y_eval = inverted[:EVALUATION_SIZE], labels[:EVALUATION_SIZE]
    x_stream, y_stream = inverted[EVALUATION_SIZE:], labels[EVALUATION_SIZE:]
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    with httpx.Client(base_url=url, headers=headers, timeout=60.0, trust_env=False) as http:
        client = _Client(http, name, data.labels)
        before_version, before = client.accuracy(x_eval, y_eval)
        summary = LearnSummary(before_version, before)
        learner = Learner(ctx.registry, name, alias=ctx.config.alias)
        try:
            _learn(ctx, client, learner, x_stream, y_stream, summary)
        finally:
            learner.close()
        for promotion in summary.promotions:
            version = promotion["version"]
            mv = ctx.registry.get(f"{name}:{version}")
            promotion.update({k: v for k, v in mv.metrics.items() if k.startswith("gate_")})
            scores = ctx.registry.load(f"{name}:{version}").predict(x_eval)
            assert isinstance(scores, np.ndarray)
            promotion["accuracy"] = float(np.mean(scores.argmax(axis=1) == y_eval))
        production = _production(ctx)
        if production != before_version:
            summary.after_version, summary.after_accuracy = client.wait_for(
                production, x_eval, y_eval
            )
    summary.seconds = time.perf_counter() - started
    return summary


def _learn(
    ctx: QuickstartContext,
    client: _Client,
    learner: Learner,
    x: Array,
    y: Array,
    summary: LearnSummary,
) -> None:
    """Feedback rounds, the learner stepping after each (or the server's, if it learns)."""
    embedded = False
    baseline = 0  # labels given before this step (the monitoring step's)
    total = min(LABELS, len(x))
    while True:
        if not embedded:
            try:
                _step_until(learner, baseline + summary.labels_sent, summary)
                if summary.labels_sent == 0:
                    baseline = summary.backlog = int(learner.status()["labels"])
            except Conflict:  # the server learns it itself (serve --learn)
                embedded = True
        sent = summary.labels_sent
        if sent >= total:
            return
        client.label(x[sent : sent + ROUND], y[sent : sent + ROUND])
        summary.labels_sent += len(x[sent : sent + ROUND])
        if embedded:
            time.sleep(1.0)  # the embedded learner steps about once a second


def _step_until(learner: Learner, labels: int, summary: LearnSummary) -> None:
    """Step until the learner has taken ``labels`` labels in (the server writes the
    predictions they label within a fraction of a second), or a few seconds passed."""
    deadline = time.monotonic() + LABEL_WAIT_S
    while True:
        events = learner.step().events
        summary.events.extend(events)
        for event in events:
            if event.kind == "promoted":
                summary.promotions.append({"version": event.version, "labels": summary.labels_sent})
        if learner.status().get("labels", 0) >= labels or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _production(ctx: QuickstartContext) -> int:
    cfg = ctx.config
    return ctx.registry.aliases(cfg.model_name)[(cfg.model_name, cfg.alias)]


class _Client:
    """Inference and feedback over HTTP for one model with one float input ``x``."""

    def __init__(self, http: httpx.Client, model: str, labels: tuple[str, ...]) -> None:
        self.http = http
        self.model = model
        self.labels = labels

    def infer(self, x: Array) -> dict[str, Any]:
        tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
        body = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
        response = self.http.post(f"/v2/models/{self.model}/infer", json=body)
        if response.status_code != 200:
            raise Unavailable(f"inference answered {response.status_code}: {response.text}")
        answer: dict[str, Any] = response.json()
        return answer

    def accuracy(self, x: Array, y: Array) -> tuple[int, float]:
        """``(version that answered, accuracy)`` on ``x``; no feedback is given."""
        answer = self.infer(x)
        out = answer["outputs"][0]
        scores = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        return int(answer["model_version"]), float(np.mean(scores.argmax(axis=1) == y))

    def label(self, x: Array, y: Array) -> None:
        """Predict ``x``, then give the true labels of every row as feedback."""
        answer = self.infer(x)
        body = {"id": answer["id"], "target": [int(v) for v in y]}
        response = self.http.post(f"/v2/models/{self.model}/feedback", json=body)
        if response.status_code != 200:
            raise InvalidInput(f"feedback answered {response.status_code}: {response.text}")

    def wait_for(self, version: int, x: Array, y: Array) -> tuple[int, float]:
        """Measure ``x`` until ``version`` answers (the server's hot swap)."""
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        while True:
            answered, accuracy = self.accuracy(x, y)
            if answered == version or time.monotonic() > deadline:
                return answered, accuracy
            time.sleep(0.2)


def show_learning(ctx: QuickstartContext, summary: LearnSummary) -> None:
    out = ctx.console
    kinds = [e.kind for e in summary.events]
    if summary.backlog:
        out.print(
            f"the learner first took in the {summary.backlog} labels given before "
            "(the monitoring step's), then:"
        )
    out.print(
        f"{summary.labels_sent} inverted digits labelled over HTTP in "
        f"{summary.seconds:.1f} s; the learner registered {kinds.count('registered')} "
        f"challengers, promoted {kinds.count('promoted')}, refused {kinds.count('refused')}, "
        f"rolled back {kinds.count('rolled_back')}"
    )
    table = Table(title="Accuracy on held-out inverted digits", title_justify="left")
    for column in ("version", "promoted after", "held-out accuracy", "gate", "p-value"):
        table.add_column(column, justify="right")
    table.add_row(
        f"v{summary.before_version}", "-", f"{summary.before_accuracy:.3f}", "champion", ""
    )
    for p in summary.promotions:
        gate = (
            f"{p.get('gate_champion', float('nan')):.2f} → "
            f"{p.get('gate_challenger', float('nan')):.2f} on {int(p.get('gate_n', 0))}"
        )
        table.add_row(
            f"v{p['version']}",
            f"{p['labels']} labels" if p["labels"] or not summary.backlog else "earlier labels",
            f"{p['accuracy']:.3f}",
            gate,
            f"{p.get('gate_p_value', float('nan')):.1e}",
        )
    out.print(table)
    if summary.after_version is None or summary.after_accuracy is None:
        out.print("no challenger beat the champion within the label budget")
        return
    out.print(
        f"the server follows the alias and now answers with [bold]v{summary.after_version}[/]: "
        "accuracy "
        f"{summary.before_accuracy:.3f} → [bold]{summary.after_accuracy:.3f}[/] on the "
        f"{EVALUATION_SIZE} held-out inverted digits"
    )
