"""Learners beside the server (``torchops serve --learn``): ``start_embedded``.

By default they run in a child process (``torchops.learning.process``). With
``mode="thread"`` they run here, in ``EmbeddedLearner``: one daemon thread steps every
learner in turn, then sleeps ``interval_s``, training with one torch thread
(``Learner.train_threads``) at a lower CPU priority (``nice``, per thread on Linux);
``stop`` ends it between steps. The thread shares the interpreter lock with the
server's event loop, which is why the process is the default (bench/learning_serving.py).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from torchops.errors import Conflict, InvalidInput, TorchopsError
from torchops.refs import DEFAULT_ALIAS, ModelRef

if TYPE_CHECKING:
    from torchops.config import Settings
    from torchops.learning.learner import Learner
    from torchops.learning.process import LearnerProcess
    from torchops.registry import Registry

__all__ = ["EmbeddedLearner", "start_embedded"]

log = logging.getLogger("torchops.learning")

#: the longest wait between retries of a learner whose steps keep failing
MAX_BACK_OFF_S = 60.0


class EmbeddedLearner:
    """Steps ``learners`` every ``interval_s`` seconds in one daemon thread.

    A step that fails is logged and retried later, with exponential back-off (up to
    ``MAX_BACK_OFF_S``); so is one whose model another process is learning (several
    server workers: one learns, the others take over if it stops). A learner that cannot
    learn its model (a task other than classification or regression) is dropped with a
    warning; a model without its alias yet is waited for.
    """

    def __init__(
        self, learners: Sequence[Learner], *, interval_s: float = 1.0, nice: int = 10
    ) -> None:
        if not interval_s > 0:
            raise InvalidInput(f"interval_s must be positive, got {interval_s}")
        if not 0 <= nice <= 19:
            raise InvalidInput(f"nice must be in 0..19, got {nice}")
        self.learners = list(learners)
        self.interval_s = interval_s
        self.nice = nice
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchops-learner", daemon=True)
        self._failures: dict[int, int] = {}
        self._wait_until: dict[int, float] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """End the thread after the current step; each learner stores its place."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def status(self) -> list[dict[str, Any]]:
        return [learner.status() for learner in self.learners]

    def _run(self) -> None:
        _lower_priority(self.nice)
        active = list(self.learners)
        try:
            while not self._stop.is_set() and active:
                for learner in list(active):
                    if self._stop.is_set():
                        break
                    if time.monotonic() < self._wait_until.get(id(learner), 0.0):
                        continue
                    try:
                        learner.step()
                        self._failures[id(learner)] = 0
                    except InvalidInput as exc:
                        if learner.started:  # bad data in a step: try again later
                            log.warning("learning step of %s failed: %s", learner.model, exc)
                            self._back_off(learner)
                        else:  # the model cannot be learned (its task)
                            log.warning("not learning %s: %s", learner.model, exc.message)
                            active.remove(learner)
                    except Conflict as exc:
                        # another process learns it: take over if its lease runs out
                        if not self._failures.get(id(learner)):
                            log.info("not learning %s for now: %s", learner.model, exc.message)
                        self._back_off(learner)
                    except TorchopsError as exc:
                        log.warning("learning step of %s failed: %s", learner.model, exc.message)
                        self._back_off(learner)
                    except Exception:
                        log.exception("learning step of %s failed", learner.model)
                        self._back_off(learner)
                self._stop.wait(self.interval_s)
        finally:
            for learner in self.learners:
                try:
                    learner.close()
                except Exception:
                    log.exception("closing the learner of %s failed", learner.model)

    def _back_off(self, learner: Learner) -> None:
        failures = self._failures.get(id(learner), 0) + 1
        self._failures[id(learner)] = failures
        delay = min(MAX_BACK_OFF_S, self.interval_s * 2**failures)
        self._wait_until[id(learner)] = time.monotonic() + delay


def _lower_priority(nice: int) -> None:
    """Make the calling thread yield the CPU to the server's threads (Linux: per thread)."""
    if not nice or not hasattr(os, "setpriority") or sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except OSError as exc:  # not permitted in some sandboxes: learn at the same priority
        log.info("could not lower the learner thread's priority: %s", exc)


def start_embedded(
    registry: Registry,
    settings: Settings,
    models: Sequence[str],
    *,
    mode: Literal["process", "thread"] = "process",
    interval_s: float = 1.0,
    nice: int = 10,
    **options: Any,
) -> EmbeddedLearner | LearnerProcess:
    """Start learning ``models`` (names, or ``name@alias``) beside the server.

    ``mode="process"`` (the default) runs the learners in a child process at ``nice``
    (10) lower CPU priority, so training never holds the server's interpreter lock;
    ``"thread"`` in a thread of this process sharing ``registry``. ``options`` are
    ``Learner`` keyword arguments; ``interval_s`` the seconds between steps. Call
    ``stop()`` on the result at shutdown.
    """
    from torchops.learning.learner import Learner
    from torchops.learning.process import LearnerProcess

    refs = [ModelRef.parse(text) for text in models]
    bad = [str(r) for r in refs if r.version is not None]
    if bad:
        raise InvalidInput(f"learning follows an alias, not a version: {bad[0]!r}")
    if mode not in ("process", "thread"):
        raise InvalidInput(f"mode must be 'process' or 'thread', got {mode!r}")
    started: EmbeddedLearner | LearnerProcess
    if mode == "process":
        started = LearnerProcess(
            settings, [str(r) for r in refs], interval_s=interval_s, nice=nice, options=options
        )
    else:
        learners = [
            Learner(registry, r.name, alias=r.alias or DEFAULT_ALIAS, **options) for r in refs
        ]
        started = EmbeddedLearner(learners, interval_s=interval_s, nice=nice)
    started.start()
    names = ", ".join(models) or "no model"
    log.info("online learning for %s in a %s (home %s)", names, mode, settings.home)
    return started
