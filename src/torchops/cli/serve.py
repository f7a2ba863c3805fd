"""``torchops serve``: the Open Inference Protocol v2 server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from torchops.cli._common import HomeOption, RegistryUrlOption, resolve_settings

__all__ = ["serve"]


def serve(
    ctx: typer.Context,
    refs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[REF]...",
            help="Models to serve (digits, digits@staging, digits:3); default: every model "
            "with a production alias.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default 127.0.0.1).", show_default=False)
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port to bind (default 8000; 0 picks a free one).", show_default=False),
    ] = None,
    home: HomeOption = None,
    registry_url: RegistryUrlOption = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(help="Most rows per batch (default 32; calibrated down).", show_default=False),
    ] = None,
    max_delay_ms: Annotated[
        float | None,
        typer.Option(
            help="Wait up to this long for fuller batches (default 0).", show_default=False
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes sharing the port.")] = 1,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log every request as a JSON line.")
    ] = False,
    auth_inference: Annotated[
        bool, typer.Option("--auth-inference", help="Require the bearer token for inference too.")
    ] = False,
    poll_interval: Annotated[
        float | None,
        typer.Option(help="Seconds between registry polls (default 1).", show_default=False),
    ] = None,
    http: Annotated[
        str, typer.Option(hidden=True, help="HTTP stack: torchops (fast) or uvicorn.")
    ] = "torchops",
    calibrate_s: Annotated[
        float, typer.Option(hidden=True, help="Seconds to calibrate the batch size per model.")
    ] = 0.5,
    threads: Annotated[
        int | None, typer.Option(hidden=True, help="torch threads (default: the CPUs allowed).")
    ] = None,
    listen_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    monitor: Annotated[
        bool,
        typer.Option(
            "--monitor/--no-monitor",
            help="Record every prediction and watch live quality, drift and alerts.",
            rich_help_panel="Monitoring",
        ),
    ] = True,
    input_sample_rate: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of inputs stored with their predictions, for inputs of more than "
            "4096 values per row (smaller ones are always kept).",
            rich_help_panel="Monitoring",
        ),
    ] = 1.0,
    retention_days: Annotated[
        float | None,
        typer.Option(
            help="Delete observations older than this many days (default: keep).",
            show_default=False,
            rich_help_panel="Monitoring",
        ),
    ] = None,
    retention_rows: Annotated[
        int | None,
        typer.Option(
            help="Keep at most this many observations per model (default: all).",
            show_default=False,
            rich_help_panel="Monitoring",
        ),
    ] = None,
    webhook: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="POST alert events (firing, resolved) as JSON to this URL.",
            show_default=False,
            rich_help_panel="Monitoring",
        ),
    ] = None,
    quality_window: Annotated[
        int,
        typer.Option(
            min=1, help="Rows of the last-N quality window.", rich_help_panel="Monitoring"
        ),
    ] = 500,
    quality_window_seconds: Annotated[
        float,
        typer.Option(help="Seconds of the last-T quality window.", rich_help_panel="Monitoring"),
    ] = 3600.0,
    drift_window: Annotated[
        int,
        typer.Option(min=1, help="Observations per drift window.", rich_help_panel="Monitoring"),
    ] = 500,
    snapshot_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between monitoring snapshots (Prometheus, TensorBoard, stored "
            "history, alerts).",
            rich_help_panel="Monitoring",
        ),
    ] = 10.0,
    monitor_follower: Annotated[bool, typer.Option(hidden=True)] = False,
    peer_grace_s: Annotated[float, typer.Option(hidden=True)] = 0.0,
    learn: Annotated[
        bool,
        typer.Option(
            "--learn",
            help="Also learn online from feedback (needs monitoring).",
            rich_help_panel="Learning",
        ),
    ] = False,
) -> None:
    """Serve models over the Open Inference Protocol v2 (KServe V2 / Triton HTTP)."""
    from torchops.errors import InvalidInput
    from torchops.monitoring.monitor import MonitorOptions
    from torchops.serving.server import HTTP_STACKS
    from torchops.serving.server import serve as run

    if http not in HTTP_STACKS:
        raise typer.BadParameter(f"expected one of {', '.join(HTTP_STACKS)}", param_hint="--http")
    settings = resolve_settings(ctx, Path(home) if home is not None else None, registry_url)
    overrides = {
        "host": host,
        "port": port,
        "max_batch_size": max_batch_size,
        "max_delay_ms": max_delay_ms,
        "poll_interval_s": poll_interval,
    }
    settings = settings.with_(**{k: v for k, v in overrides.items() if v is not None})
    if learn and not monitor:
        raise typer.BadParameter("online learning needs monitoring", param_hint="--learn")
    try:
        monitor_options = MonitorOptions(
            input_sample_rate=input_sample_rate,
            retention_days=retention_days,
            retention_rows=retention_rows,
            webhook_url=webhook,
            quality_window=quality_window,
            quality_window_seconds=quality_window_seconds,
            drift_window=drift_window,
            snapshot_interval_s=snapshot_interval,
            leader=not monitor_follower,
            peer_grace_s=peer_grace_s,
        )
    except InvalidInput as exc:
        raise typer.BadParameter(exc.message) from None
    run(
        refs or (),
        settings=settings,
        workers=workers,
        access_log=access_log,
        auth_inference=auth_inference,
        http=http,  # type: ignore[arg-type]
        calibrate_s=calibrate_s,
        threads=threads,
        listen_fd=listen_fd,
        monitor=monitor,
        monitor_options=monitor_options,
        learn=learn,
    )
