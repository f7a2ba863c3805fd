"""The quickstart as a list of steps sharing one context.

Each step reads what earlier steps left in the ``QuickstartContext`` and adds its own
results. The serve step starts a real server that later steps talk to
(``ctx.server_url``, ``ctx.token``); steps marked ``needs_server`` are skipped when the
quickstart runs without one (``QuickstartConfig(serve=False)``, ``--no-serve``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from torchops.config import Settings
from torchops.errors import InvalidInput
from torchops.quickstart.data import DigitsData, load_digits_data
from torchops.quickstart.learn_step import learn_step
from torchops.quickstart.monitor_step import monitor_step
from torchops.quickstart.serve_step import serve_step
from torchops.types import FORMATS, ModelVersion

if TYPE_CHECKING:
    import torch

    from torchops.packaging import ExportReport
    from torchops.quickstart.model import DigitsMLP
    from torchops.quickstart.serve_step import PhaseResult, ServerProcess
    from torchops.registry import Registry

__all__ = [
    "STEPS",
    "QuickstartConfig",
    "QuickstartContext",
    "Step",
    "run_quickstart",
]


@dataclass(frozen=True, slots=True)
class QuickstartConfig:
    """What the quickstart trains and how it names the result."""

    epochs: int = 30
    seed: int = 0
    batch_size: int = 64
    learning_rate: float = 3e-3
    hidden: int = 128
    test_fraction: float = 0.25
    reference_size: int = 500
    example_size: int = 16
    model_name: str = "digits"
    alias: str = "production"
    #: start the inference server and run the steps that need it (False: --no-serve)
    serve: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidInput(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InvalidInput(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class QuickstartContext:
    """State the steps share: inputs at the top, each step's results below."""

    settings: Settings
    config: QuickstartConfig
    console: Console
    run_id: str
    command: str = "torchops"
    data: DigitsData | None = None
    model: DigitsMLP | None = None
    optimizer: torch.optim.Optimizer | None = None
    train_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    tensorboard_dir: Path | None = None
    checkpoint_path: Path | None = None
    reports: list[ExportReport] = field(default_factory=list)
    version: ModelVersion | None = None
    previous_version: int | None = None
    #: the running server (serve step): its base URL and the management token
    server_url: str | None = None
    token: str | None = None
    server: ServerProcess | None = None
    serve_results: list[PhaseResult] = field(default_factory=list)
    _registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from torchops.registry import Registry

            self._registry = Registry(settings=self.settings)
        return self._registry

    def close(self) -> None:
        """Stop the server (SIGTERM, then wait) if a step started one; close the registry."""
        try:
            if self.server is not None:
                self.server.stop()
        finally:
            if self._registry is not None:
                self._registry.close()

    def trained(self) -> tuple[DigitsData, DigitsMLP]:
        if self.data is None or self.model is None:
            raise RuntimeError("the train step has not run")
        return self.data, self.model

    def registered(self) -> ModelVersion:
        if self.version is None:
            raise RuntimeError("the register step has not run")
        return self.version


@dataclass(frozen=True, slots=True)
class Step:
    """One stage of the quickstart: a short title and the function that does it.

    ``needs_server``: the step starts or uses the server, so it is skipped without one.
    """

    name: str
    title: str
    run: Callable[[QuickstartContext], None]
    needs_server: bool = False


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op torch threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_step(ctx: QuickstartContext) -> None:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from torchops.quickstart.model import DigitsMLP
    from torchops.quickstart.train import EpochStats, evaluate, train_classifier

    cfg = ctx.config
    torch.manual_seed(cfg.seed)
    data = load_digits_data(cfg.seed, cfg.test_fraction)
    model = DigitsMLP(data.n_features, data.n_classes, cfg.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    ctx.console.print(
        f"scikit-learn digits: {len(data.x_train)} training and {len(data.x_test)} test images "
        f"of {data.n_features} pixels, {data.n_classes} classes"
    )
    log_dir = ctx.settings.tensorboard_dir / "quickstart" / ctx.run_id
    progress = Progress(
        TextColumn("[bold]epoch"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=ctx.console,
    )
    writer = SummaryWriter(log_dir=str(log_dir))
    # a model this small gains nothing from parallel ops, and on a busy machine a second
    # thread that is not scheduled stalls every step (measured: 3x slower on two cores)
    try:
        with progress, _torch_threads(1):
            task = progress.add_task("", total=cfg.epochs)

            def on_epoch(stats: EpochStats) -> None:
                for name, value in (
                    ("loss/train", stats.train_loss),
                    ("accuracy/train", stats.train_accuracy),
                    ("loss/test", stats.test.loss),
                    ("accuracy/test", stats.test.accuracy),
                    ("f1_macro/test", stats.test.f1_macro),
                ):
                    writer.add_scalar(name, value, global_step=stats.epoch)
                progress.update(
                    task,
                    advance=1,
                    description=f"loss {stats.train_loss:.4f}  test accuracy "
                    f"{stats.test.accuracy:.3f}",
                )

            ctx.train_steps = train_classifier(
                model,
                optimizer,
                data.x_train,
                data.y_train,
                data.x_test,
                data.y_test,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                on_epoch=on_epoch,
            )
    finally:
        writer.close()
    ctx.data, ctx.model, ctx.optimizer = data, model, optimizer
    ctx.metrics = evaluate(model, data.x_test, data.y_test).as_metrics()
    ctx.tensorboard_dir = log_dir
    m = ctx.metrics
    ctx.console.print(
        f"test accuracy [bold]{m['accuracy']:.4f}[/], macro F1 {m['f1_macro']:.4f}, "
        f"loss {m['loss']:.4f} after {ctx.train_steps} steps"
    )


def checkpoint_step(ctx: QuickstartContext) -> None:
    from torchops.packaging import save_checkpoint

    _, model = ctx.trained()
    path = ctx.settings.home / "checkpoints" / ctx.config.model_name / f"{ctx.run_id}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        path,
        model,
        ctx.optimizer,
        step=ctx.train_steps,
        extra={"epochs": ctx.config.epochs, "seed": ctx.config.seed, **ctx.metrics},
    )
    ctx.checkpoint_path = path
    ctx.console.print(
        f"model + optimizer state at step {ctx.train_steps} saved to {escape(str(path))}"
    )


def register_step(ctx: QuickstartContext) -> None:
    from torchops.cli.render import reports_table
    from torchops.packaging import package

    data, model = ctx.trained()
    cfg = ctx.config
    rng = np.random.default_rng(cfg.seed)
    size = min(cfg.reference_size, len(data.x_train))
    reference = data.x_train[np.sort(rng.choice(len(data.x_train), size, replace=False))]
    model.eval()
    pkg = package(
        model,
        data.x_test[: cfg.example_size],
        formats=FORMATS,
        task="classification",
        labels=data.labels,
        reference=reference,
    )
    tags = {"dataset": "sklearn-digits", "epochs": str(cfg.epochs), "seed": str(cfg.seed)}
    if ctx.checkpoint_path is not None:
        tags["checkpoint"] = str(ctx.checkpoint_path)
    ctx.version = ctx.registry.register_package(
        cfg.model_name,
        pkg,
        metrics=ctx.metrics,
        tags=tags,
        source="quickstart",
        description="MLP classifier of scikit-learn's 8x8 digits (torchops quickstart)",
    )
    ctx.reports = list(pkg.reports)
    ctx.console.print(reports_table(ctx.reports))
    ctx.console.print(
        f"registered [bold]{ctx.version.name}:{ctx.version.version}[/] with formats "
        f"{', '.join(ctx.version.formats)}, a reference sample of {size} training images "
        "and its test metrics"
    )


def promote_step(ctx: QuickstartContext) -> None:
    mv = ctx.registered()
    alias = ctx.config.alias
    ctx.previous_version = ctx.registry.aliases(mv.name).get((mv.name, alias))
    ctx.registry.set_alias(mv.name, alias, mv.version, reason="quickstart")
    moved = f" (moved from v{ctx.previous_version})" if ctx.previous_version is not None else ""
    ctx.console.print(f"{mv.name}@{alias} → v{mv.version}{moved}")


def summary_step(ctx: QuickstartContext) -> None:
    from sqlalchemy.engine import make_url

    from torchops.monitoring import segment_dir

    settings = ctx.settings
    mv = ctx.registered()
    where = Table(title="Where things are", title_justify="left", show_header=False)
    where.add_column(style="bold")
    where.add_column(overflow="fold")
    rows = [
        ("home", str(settings.home)),
        ("registry database", make_url(settings.database_url).render_as_string(hide_password=True)),
        ("artifacts", settings.artifacts_location),
    ]
    if ctx.checkpoint_path is not None:
        rows.append(("checkpoint", str(ctx.checkpoint_path)))
    if ctx.tensorboard_dir is not None:
        rows.append(("TensorBoard", f"tensorboard --logdir {ctx.tensorboard_dir.parent}"))
    observations = segment_dir(ctx.registry.engine)
    if observations is not None and observations.is_dir():
        rows.append(("observation arrays", str(observations)))
    if ctx.server is not None:
        rows.append(("server log", str(ctx.server.log_path)))
        token = "TORCHOPS_TOKEN" if settings.token else str(settings.token_path)
        rows.append(("server token", token))
    for key, value in rows:
        where.add_row(key, Text(value))
    ctx.console.print(where)
    default_home = settings.home == Settings().home
    flag = "" if default_home else f" --home {settings.home}"
    ctx.console.print("Next, try:")
    for command in (
        f"{ctx.command} show {mv.name}{flag}",
        f"{ctx.command} versions {mv.name}{flag}",
        f"{ctx.command} history {mv.name}{flag}",
        f"{ctx.command} serve {mv.name}{flag}",
    ):
        ctx.console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)
    home_arg = "" if default_home else repr(str(settings.home))
    ctx.console.print(
        escape(f"  python: torchops.Registry({home_arg}).load({mv.name!r}).predict(images)"),
        highlight=False,
        soft_wrap=True,
    )


STEPS: tuple[Step, ...] = (
    Step("train", "Train a classifier on scikit-learn's digits", train_step),
    Step("checkpoint", "Save a resumable checkpoint", checkpoint_step),
    Step("register", "Register it: every format, parity-checked", register_step),
    Step("promote", "Point the production alias at it", promote_step),
    Step("serve", "Serve it over HTTP and send it the test set", serve_step, needs_server=True),
    Step(
        "monitor",
        "Watch it: feedback, a shifted batch, drift and alerts",
        monitor_step,
        needs_server=True,
    ),
    Step("learn", "Learn the drift from feedback and promote", learn_step, needs_server=True),
    Step("summary", "What happened and where", summary_step),
)


def run_quickstart(
    settings: Settings,
    config: QuickstartConfig | None = None,
    *,
    console: Console | None = None,
    steps: Sequence[Step] = STEPS,
    command: str = "torchops",
) -> QuickstartContext:
    """Run ``steps`` in order and return the context they filled in.

    Steps that need the server are left out when ``config.serve`` is False. A server a
    step started is stopped before this returns or raises. ``command`` is how the summary
    spells the ``torchops`` command in its suggestions.
    """
    config = config or QuickstartConfig()
    steps = [step for step in steps if config.serve or not step.needs_server]
    ctx = QuickstartContext(
        settings=settings,
        config=config,
        console=console or Console(),
        run_id=datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f"),
        command=command,
    )
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        for index, step in enumerate(steps, start=1):
            ctx.console.rule(f"[bold]{index}/{len(steps)} {step.title}", align="left")
            step.run(ctx)
    finally:
        ctx.close()
    return ctx
