"""Run the inference server: settings, token, socket, event loop, workers, shutdown.

``serve`` blocks until SIGTERM or SIGINT, then stops accepting, lets the requests in
flight finish, drains the batchers and exits. With ``workers`` > 1 the parent binds the
socket and starts that many worker processes sharing it (each loads the models itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torchops.config import Settings
from torchops.serving.auth import TokenAuth, load_token

if TYPE_CHECKING:
    from torchops.monitoring.monitor import MonitorOptions

__all__ = ["HTTP_STACKS", "bind", "serve"]

log = logging.getLogger("torchops.serving")

HTTP_STACKS = ("torchops", "uvicorn")
#: how long feedback for an unknown id waits for the other workers' observation writers
_PEER_GRACE_S = 1.0
HttpStack = Literal["torchops", "uvicorn"]
#: objects created and not yet freed before the GC collects the young generation
_GC_YOUNG = 50_000
#: collections of a younger generation before the next older one is collected
_GC_OLDER = 20


def _settle_gc() -> None:
    """Tune the cyclic GC for serving, once everything is loaded.

    Everything loaded so far lives as long as the server: it is kept out of the GC, whose
    full collections otherwise stall every request for ~100 ms (measured). Requests
    allocate and free their objects (coroutines, futures, dicts of arrays) by reference
    counting; with the default young-generation threshold, 700 objects created and not
    yet freed, the young generation was collected every ~200 requests at concurrency 64,
    each time walking the objects of every request in flight (0.3 µs per request,
    measured). With ``_GC_YOUNG`` it is collected when that many have piled up, so the
    reference cycles a server does make are still freed.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, _GC_OLDER, _GC_OLDER)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _setup_logging(access_log: bool) -> None:
    if logging.getLogger().handlers:
        return  # the embedding application configured logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("torchops")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    access = logging.getLogger("torchops.access")
    access.propagate = False
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(plain)


def _torch_threads(threads: int | None) -> int:
    """Set torch's thread counts for this process and return the intra-op count."""
    import torch

    if threads is None:
        # torch counts the machine's cores; a pinned process should use what it may run on
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        threads = min(torch.get_num_threads(), len(allowed) if allowed else os.cpu_count() or 1)
    threads = max(1, threads)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)
    return threads


def serve(
    refs: Sequence[str] = (),
    *,
    settings: Settings | None = None,
    workers: int = 1,
    access_log: bool = False,
    auth_inference: bool = False,
    http: HttpStack = "torchops",
    calibrate_s: float = 0.5,
    threads: int | None = None,
    listen_fd: int | None = None,
    drain_timeout_s: float = 30.0,
    monitor: bool = True,
    monitor_options: MonitorOptions | None = None,
    learn: bool = False,
) -> None:
    """Serve ``refs`` (or every model with a ``production`` alias) until SIGTERM/SIGINT.

    ``monitor`` records every prediction and runs a ``Monitor`` (``monitor_options``,
    defaults otherwise); ``learn`` also runs the online learner for the served models.
    """
    settings = settings if settings is not None else Settings.load()
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if http not in HTTP_STACKS:
        raise ValueError(f"unknown HTTP stack {http!r}; expected one of {HTTP_STACKS}")
    _setup_logging(access_log)
    token, token_path = load_token(settings)
    primary = listen_fd is None
    sock = bind(settings.host, settings.port) if primary else socket.socket(fileno=listen_fd)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    if primary and workers > 1:
        options = [f"--http={http}", f"--calibrate-s={calibrate_s}"]
        options += ["--access-log"] if access_log else []
        options += ["--auth-inference"] if auth_inference else []
        options += [f"--threads={threads}"] if threads is not None else []
        if not monitor:
            options.append("--no-monitor")
        _announce(url, token_path, workers)
        _run_workers(sock, workers, refs, settings, token, options, monitor_options, learn)
        return
    threads = _torch_threads(threads)
    main = _main(
        refs,
        settings,
        sock,
        TokenAuth(token),
        access_log=access_log,
        auth_inference=auth_inference,
        http=http,
        calibrate_s=calibrate_s,
        drain_timeout_s=drain_timeout_s,
        threads=threads,
        announce=(url, token_path) if primary else None,
        monitor_options=_monitor_options(monitor_options) if monitor else None,
        learn=learn,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(main)
    else:
        uvloop.run(main)


def _monitor_options(options: MonitorOptions | None) -> MonitorOptions:
    from torchops.monitoring.monitor import MonitorOptions

    return options if options is not None else MonitorOptions()


def _announce(url: str, token_path: Path | None, workers: int = 1) -> None:
    where = f"in {token_path}" if token_path is not None else "from TORCHOPS_TOKEN"
    print(f"torchops serving on {url} ({workers} worker{'s' if workers > 1 else ''})", flush=True)
    print(f"  API docs: {url}/docs   metrics: {url}/metrics", flush=True)
    print(f"  management token: {where}", flush=True)


async def _main(
    refs: Sequence[str],
    settings: Settings,
    sock: socket.socket,
    auth: TokenAuth,
    *,
    access_log: bool,
    auth_inference: bool,
    http: HttpStack,
    calibrate_s: float,
    drain_timeout_s: float,
    threads: int,
    announce: tuple[str, Path | None] | None,
    monitor_options: MonitorOptions | None,
    learn: bool,
) -> None:
    from torchops.registry import Registry
    from torchops.serving.app import create_app
    from torchops.serving.httpd import HttpServer
    from torchops.serving.manager import ModelManager
    from torchops.serving.service import InferenceService

    registry = Registry(settings=settings)
    manager = ModelManager(
        registry,
        refs=refs,
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
        max_queue=settings.max_queue,
        poll_interval_s=settings.poll_interval_s,
        calibrate_s=calibrate_s,
        drain_timeout_s=drain_timeout_s,
        threads=threads,
    )
    monitor = None
    if monitor_options is not None:
        from torchops.monitoring.monitor import Monitor

        monitor = Monitor(
            registry, settings, monitor_options, metrics_registry=manager.metrics.registry
        )
    service = InferenceService(
        manager,
        auth=auth,
        auth_inference=auth_inference,
        max_body_bytes=settings.max_body_bytes,
        request_timeout_s=settings.request_timeout_s,
        access_log=access_log,
        monitor=monitor,
    )
    app = create_app(service)
    learner: Any = None
    try:
        if http == "uvicorn":
            await _run_uvicorn(app, sock, announce)
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await app.startup()
        if learn:
            from torchops.learning.learner import start_embedded

            learner = start_embedded(registry, settings, sorted(manager.routes))
        server = HttpServer(app, access_log=access_log)
        await server.start(sock)
        _settle_gc()
        if announce is not None:
            _announce(*announce)
        await stop.wait()
        log.info("shutting down: finishing requests in flight")
        await server.shutdown(drain_timeout_s)
        if learner is not None:
            await asyncio.to_thread(learner.stop)
            learner = None
        await app.shutdown()
    finally:
        if learner is not None:
            learner.stop()
        registry.close()


async def _run_uvicorn(
    app: Any, sock: socket.socket, announce: tuple[str, Path | None] | None
) -> None:
    import uvicorn

    config = uvicorn.Config(
        app, loop="none", http="httptools", lifespan="on", access_log=False, log_config=None
    )
    server = uvicorn.Server(config)
    if announce is not None:
        _announce(*announce)
    await server.serve(sockets=[sock])


def _run_workers(
    sock: socket.socket,
    workers: int,
    refs: Sequence[str],
    settings: Settings,
    token: str,
    options: list[str],
    monitor_options: MonitorOptions | None = None,
    learn: bool = False,
) -> None:
    """Start ``workers`` processes serving ``sock``; forward SIGTERM/SIGINT; wait for them.

    With monitoring on, the first worker leads it (snapshots, TensorBoard, alerts) and is
    the one that learns online when ``learn``.
    """
    env = dict(os.environ)
    for field in fields(settings):
        value = getattr(settings, field.name)
        if value is not None:
            env[f"TORCHOPS_{field.name.upper()}"] = str(value)
    env["TORCHOPS_TOKEN"] = token
    fd = sock.fileno()
    command = [sys.executable, "-m", "torchops.serving", *refs, *options, "--listen-fd", str(fd)]
    commands = [command] * workers
    if "--no-monitor" not in options:
        # feedback may reach a worker before the one that answered has written the prediction
        leader = replace(_monitor_options(monitor_options), peer_grace_s=_PEER_GRACE_S)
        follower = replace(leader, leader=False)
        commands = [command + (leader if i == 0 else follower).cli_args() for i in range(workers)]
    if learn:
        commands[0] = [*commands[0], "--learn"]
    children = [subprocess.Popen(c, env=env, pass_fds=(fd,)) for c in commands]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    sock.close()
    if any(codes):
        raise SystemExit(max(codes))
