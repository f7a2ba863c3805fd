"""Learners in a child process of the server, at a lower CPU priority (``serve --learn``).

A learner thread inside the server shares the interpreter lock with the event loop: while
it trains, requests wait for the lock (bench/learning_serving.py measured the 90th
percentile latency up to ~3x with training non-stop). In its own process, at ``nice`` 10,
it competes for nothing but CPU time, which the scheduler gives the server first.

``LearnerProcess`` starts ``python -m torchops.learning MODEL...`` with the server's
settings in its environment (``TORCHOPS_*``, the token left out) and the learners' options
as JSON; ``stop`` asks it to finish its step and store its place (SIGTERM), then waits.
The child stops by itself when its parent dies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from torchops.config import Settings
from torchops.errors import InvalidInput

__all__ = ["LearnerProcess", "decode_options", "encode_options", "main"]

log = logging.getLogger("torchops.learning")

#: ``Learner`` options that are configuration objects, rebuilt from their fields
_CONFIGS = {"train": "TrainConfig", "gate": "GateConfig", "guard": "GuardConfig"}


def encode_options(options: Mapping[str, Any]) -> str:
    """``Learner`` keyword arguments as JSON (configs as their fields)."""
    plain: dict[str, Any] = {}
    for key, value in options.items():
        if key in _CONFIGS and dataclasses.is_dataclass(value) and not isinstance(value, type):
            plain[key] = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            plain[key] = list(value)
        else:
            plain[key] = value
    try:
        return json.dumps(plain)
    except TypeError as exc:
        raise InvalidInput(f"learner options must be plain values or configs: {exc}") from None


def decode_options(text: str) -> dict[str, Any]:
    """The inverse of ``encode_options``."""
    from torchops.learning import gate, guard, trainer

    modules = {"train": trainer, "gate": gate, "guard": guard}
    options: dict[str, Any] = json.loads(text)
    for key, cls in _CONFIGS.items():
        if isinstance(options.get(key), dict):
            options[key] = getattr(modules[key], cls)(**options[key])
    return options


class LearnerProcess:
    """``python -m torchops.learning`` for ``models``, started by ``start()``."""

    def __init__(
        self,
        settings: Settings,
        models: Sequence[str],
        *,
        interval_s: float = 1.0,
        nice: int = 10,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise InvalidInput(f"interval_s must be positive, got {interval_s}")
        if not 0 <= nice <= 19:
            raise InvalidInput(f"nice must be in 0..19, got {nice}")
        self.settings = settings
        self.models = list(models)
        self.interval_s = interval_s
        self.nice = nice
        self.options = dict(options or {})
        self._encoded = encode_options(self.options)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        for f in dataclasses.fields(self.settings):
            value, name = getattr(self.settings, f.name), f"TORCHOPS_{f.name.upper()}"
            if value is None or f.name == "token":
                env.pop(name, None)
            else:
                env[name] = str(value)
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torchops.learning", *self.models]
        command += [f"--interval={self.interval_s}", f"--nice={self.nice}"]
        command += [f"--parent={os.getpid()}", f"--options={self._encoded}"]
        self._process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self, timeout: float | None = 60.0) -> None:
        """SIGTERM (the child finishes its step and stores its place), wait, then kill."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the learner process did not stop in %s s; killing it", timeout)
            process.kill()
            process.wait()

    def status(self) -> list[dict[str, Any]]:
        return [{"model": m, "process": self.pid, "running": self.running} for m in self.models]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m torchops.learning MODEL... [--interval S] [--nice N] [--options JSON]``."""
    parser = argparse.ArgumentParser(prog="python -m torchops.learning")
    parser.add_argument("models", nargs="+", metavar="MODEL")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--parent", type=int, default=None)
    parser.add_argument("--options", default="{}")
    args = parser.parse_args(argv)
    if args.nice and hasattr(os, "nice"):
        os.nice(args.nice)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    import torch

    torch.set_num_threads(1)
    from torchops.learning.learner import start_embedded
    from torchops.registry import Registry

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    settings = Settings.load()
    with Registry(settings=settings) as registry:
        embedded = start_embedded(
            registry,
            settings,
            args.models,
            mode="thread",
            interval_s=args.interval,
            nice=0,
            **decode_options(args.options),
        )
        try:
            while not stop.wait(1.0) and embedded.running:
                if args.parent is not None and os.getppid() != args.parent:
                    log.info("the server stopped; the learner stops too")
                    break
        finally:
            embedded.stop()
