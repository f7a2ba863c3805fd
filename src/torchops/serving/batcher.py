"""Dynamic batching: one queue and one compute thread per served model version.

Requests queue while the compute thread is busy; when it frees it takes everything queued,
up to ``max_batch_size`` rows, stacks the inputs along dim 0, runs the model once and hands
each request its rows of the result. Nothing waits when the server is idle (unless
``max_delay_ms`` asks for fuller batches). If a batch raises, each of its requests is
retried on its own so that only the bad one fails. Results reach the event loop with one
``call_soon_threadsafe`` per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from torchops.errors import DeadlineExceeded, InvalidInput, Overloaded, TorchopsError, Unavailable
from torchops.runtime.base import Runtime
from torchops.serving.datatypes import datatype_of, numpy_dtype
from torchops.serving.metrics import ServingMetrics
from torchops.types import Array

__all__ = ["Batcher", "Observer", "calibrate_batch_size", "measure_batch_sizes"]

log = logging.getLogger(__name__)

# what the compute thread hands back per request: (future, outputs, error)
_Outcome = tuple[
    "asyncio.Future[dict[str, Array]]", "dict[str, Array] | None", "BaseException | None"
]


#: called on the compute thread with each answered batch: (request ids, rows per request
#: or None when one each, start times, stacked inputs, stacked outputs)
Observer = Callable[
    [Sequence[int | str], Sequence[int] | None, Sequence[float], Mapping[str, Array],
     Mapping[str, Array]],
    None,
]  # fmt: skip


class _Pending:
    __slots__ = (
        "deadline",
        "enqueued",
        "future",
        "inputs",
        "loop",
        "request_id",
        "rows",
        "started",
    )

    def __init__(
        self,
        inputs: dict[str, Array],
        rows: int,
        deadline: float | None,
        future: asyncio.Future[dict[str, Array]],
        loop: asyncio.AbstractEventLoop,
        request_id: int | str | None,
        started: float | None,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.deadline = deadline
        self.future = future
        self.loop = loop
        self.enqueued = time.monotonic()
        self.request_id = request_id
        self.started = self.enqueued if started is None else started


def _deliver(outcomes: list[_Outcome]) -> None:
    for future, result, error in outcomes:
        if future.done():  # the caller gave up (cancelled)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class Batcher:
    """Queue requests for ``runtime`` and run them in batches on a compute thread.

    ``max_queue`` bounds the number of waiting requests (beyond it ``submit`` raises
    ``Overloaded``); ``num_threads``, when given, is passed to ``torch.set_num_threads`` by
    the compute thread. The batcher does not own ``runtime``: ``close`` leaves it open.
    ``observer`` (e.g. the monitor's) is called on the compute thread with every answered
    batch of requests that were submitted with a ``request_id``; it must be quick and
    must not raise.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        model: str,
        version: int,
        max_batch_size: int = 32,
        max_delay_ms: float = 0.0,
        max_queue: int = 1024,
        metrics: ServingMetrics | None = None,
        num_threads: int | None = None,
        observer: Observer | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise InvalidInput(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise InvalidInput(f"max_delay_ms must not be negative, got {max_delay_ms}")
        if max_queue < 1:
            raise InvalidInput(f"max_queue must be at least 1, got {max_queue}")
        self.runtime = runtime
        self.model = model
        self.version = version
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.max_queue = max_queue
        self.metrics = metrics
        self.num_threads = num_threads
        self.observer = observer
        inputs = runtime.signature.inputs
        # requests stack along dim 0 only when every input has a variable leading dim
        self._stackable = bool(inputs) and all(s.shape[:1] == (-1,) for s in inputs)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._in_flight = 0
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._draining = False
        self._closed = False
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def __repr__(self) -> str:
        return (
            f"Batcher(model={self.model!r}, version={self.version}, "
            f"max_batch_size={self.max_batch_size}, max_delay_ms={self.max_delay_ms}, "
            f"max_queue={self.max_queue})"
        )

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the compute thread."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests in the batch the compute thread is running now."""
        return self._in_flight

    def start(self) -> None:
        """Start the compute thread (once; later calls do nothing)."""
        with self._cond:
            if self._closed:
                raise Unavailable(f"model {self.model!r} version {self.version} is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"torchops-batcher-{self.model}-{self.version}", daemon=True
            )
        self._thread.start()

    async def submit(
        self,
        inputs: dict[str, Array],
        *,
        deadline: float | None = None,
        request_id: int | str | None = None,
        started: float | None = None,
    ) -> dict[str, Array]:
        """Run ``inputs`` (one or more rows) in the next batch and return their outputs.

        ``deadline`` is a ``time.monotonic()`` time after which the request is dropped
        with ``DeadlineExceeded`` instead of being run. ``request_id`` (with ``started``,
        the ``time.monotonic()`` time the request arrived) names the request to the
        observer; requests without one are not observed.
        """
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(
                f"model {self.model!r} version {self.version}: the request's deadline passed "
                "before it was queued"
            )
        rows = self._rows(inputs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Array]] = loop.create_future()
        with self._cond:
            if self._draining or self._closed:
                raise Unavailable(
                    f"model {self.model!r} version {self.version} is shutting down; retry"
                )
            if len(self._queue) >= self.max_queue:
                raise Overloaded(
                    f"model {self.model!r} version {self.version} is overloaded: "
                    f"{len(self._queue)} requests are queued (max_queue={self.max_queue})"
                )
            self._queue.append(_Pending(inputs, rows, deadline, future, loop, request_id, started))
            self._queued_rows += rows
            self._cond.notify()
        return await future

    def _rows(self, inputs: Mapping[str, Array]) -> int:
        if not self._stackable:
            return 1
        rows = -1
        for array in inputs.values():
            n = array.shape[0] if array.ndim else -2
            if rows == -1:
                rows = n
            elif n != rows:
                rows = -2
        if rows < 0:
            raise InvalidInput(
                f"model {self.model!r}: inputs must share their batch size (dim 0), got "
                + (", ".join(f"{n!r} {list(a.shape)}" for n, a in inputs.items()) or "none")
            )
        if rows == 0:  # every request has a row: a batch of n rows is n requests of one
            raise InvalidInput(f"model {self.model!r}: empty batch (0 rows)")
        return rows

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new requests and wait until the queue is empty and nothing is running.

        Raises ``DeadlineExceeded`` if that takes longer than ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._cond:
            self._draining = True
            if not self._queue and not self._in_flight:
                return
            self._idle_waiters.append((loop, waiter))
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {self.model!r} version {self.version} did not drain within {timeout} s: "
                f"{self.queue_depth} queued, {self.in_flight} running"
            ) from None

    def close(self) -> None:
        """Stop: queued requests fail with ``Unavailable``; the running batch completes."""
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._cond.notify_all()
            thread = self._thread
        message = f"model {self.model!r} version {self.version} was unloaded; retry"
        self._send([(p, None, Unavailable(message)) for p in dropped])
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._notify_idle()

    # -- compute thread -----------------------------------------------------------------

    def _run(self) -> None:
        if self.num_threads is not None:
            import torch

            torch.set_num_threads(self.num_threads)
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if self.max_delay_ms > 0:
                    self._wait_for_fuller_batch()
                    if self._closed:  # closed while waiting: close() failed the queue
                        return
                batch = self._take()
                self._in_flight = len(batch)
            try:
                self._execute(batch)
            except BaseException as exc:  # a bug here must not leave callers waiting
                log.exception("batcher of %s version %s failed", self.model, self.version)
                self._send([(p, None, exc) for p in batch])
            with self._cond:
                self._in_flight = 0
            self._notify_idle()

    def _wait_for_fuller_batch(self) -> None:
        until = self._queue[0].enqueued + self.max_delay_ms / 1000
        while self._queued_rows < self.max_batch_size and not self._closed:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    def _take(self) -> list[_Pending]:
        """Pop the oldest requests that fit in max_batch_size rows (at least one)."""
        first = self._queue.popleft()
        batch = [first]
        rows = first.rows
        if self._stackable:
            while self._queue and rows + self._queue[0].rows <= self.max_batch_size:
                item = self._queue.popleft()
                batch.append(item)
                rows += item.rows
        self._queued_rows -= rows
        return batch

    def _notify_idle(self) -> None:
        with self._cond:
            if self._queue or self._in_flight or not self._idle_waiters:
                return
            waiters, self._idle_waiters = self._idle_waiters, []
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, waiter in waiters:
            by_loop.setdefault(loop, []).append(waiter)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                loop.call_soon_threadsafe(_wake, futures)

    def _execute(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live: list[_Pending] = []
        done: list[tuple[_Pending, dict[str, Array] | None, BaseException | None]] = []
        for p in batch:
            if p.future.cancelled():
                continue
            if p.deadline is not None and p.deadline < now:
                done.append((p, None, self._expired(now - p.enqueued)))
                continue
            live.append(p)
            if self.metrics is not None:
                self.metrics.observe_queue(self.model, self.version, now - p.enqueued)
        if live:
            start = time.perf_counter()
            results = self._predict(live)
            if self.metrics is not None:
                rows = sum(p.rows for p in live)
                seconds = time.perf_counter() - start
                self.metrics.observe_compute(self.model, self.version, seconds, rows)
            done.extend((p, out, err) for p, (out, err) in zip(live, results, strict=True))
        self._send(done)

    def _expired(self, waited: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"model {self.model!r} version {self.version}: the request's deadline passed after "
            f"{waited * 1000:.1f} ms in the queue"
        )

    def _predict(
        self, live: list[_Pending]
    ) -> list[tuple[dict[str, Array] | None, BaseException | None]]:
        if len(live) > 1 and self._stackable:
            try:
                return self._predict_stacked(live)
            except Exception:  # split and retry: only the request that fails gets an error
                pass
        return [self._predict_one(p) for p in live]

    def _predict_stacked(
        self, live: list[_Pending]
    ) -> list[tuple[dict[str, Array] | None, BaseException | None]]:
        names = live[0].inputs.keys()
        stacked = {n: np.concatenate([p.inputs[n] for p in live]) for n in names}
        outputs = self.runtime.predict_batch(stacked)
        total = sum(p.rows for p in live)
        if not all(a.ndim and a.shape[0] == total for a in outputs.values()):
            # the model does not keep the batch dimension: run requests one by one from now on
            self._stackable = False
            raise TorchopsError(f"model {self.model!r} outputs do not follow the batch size")
        if self.observer is not None:
            self._observe(live, stacked, outputs, total)
        results: list[tuple[dict[str, Array] | None, BaseException | None]] = []
        start = 0
        for p in live:
            end = start + p.rows
            results.append(({n: a[start:end] for n, a in outputs.items()}, None))
            start = end
        return results

    def _predict_one(self, p: _Pending) -> tuple[dict[str, Array] | None, BaseException | None]:
        try:
            outputs = self.runtime.predict_batch(p.inputs)
        except Exception as exc:
            return None, exc
        if self.observer is not None and all(
            a.ndim and a.shape[0] == p.rows for a in outputs.values()
        ):
            self._observe([p], p.inputs, outputs, p.rows)
        return outputs, None

    def _observe(
        self,
        live: list[_Pending],
        inputs: Mapping[str, Array],
        outputs: Mapping[str, Array],
        total: int,
    ) -> None:
        """Hand an answered batch of ``total`` rows to the observer (only requests that
        carry an id)."""
        observer = self.observer
        if observer is None:
            return
        ids = [p.request_id for p in live]
        if None in ids:  # not named: not observed
            if len(live) == 1:
                return
            mask = np.repeat([i is not None for i in ids], [p.rows for p in live])
            inputs = {k: v[mask] for k, v in inputs.items()}
            outputs = {k: v[mask] for k, v in outputs.items()}
            live = [p for p in live if p.request_id is not None]
            if not live:
                return
            ids = [p.request_id for p in live]
            total = sum(p.rows for p in live)
        # one row per request (the usual case) needs no list of counts
        rows = None if total == len(live) else [p.rows for p in live]
        try:
            observer(ids, rows, [p.started for p in live], inputs, outputs)  # type: ignore[arg-type]
        except Exception:  # observing must never fail a batch
            log.exception("the observer of %s version %s failed", self.model, self.version)

    def _send(
        self, done: Sequence[tuple[_Pending, dict[str, Array] | None, BaseException | None]]
    ) -> None:
        """Hand results to each request's event loop: one callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for p, result, error in done:
            by_loop.setdefault(p.loop, []).append((p.future, result, error))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its callers are gone
                loop.call_soon_threadsafe(_deliver, outcomes)


def calibrate_batch_size(
    runtime: Runtime,
    *,
    max_batch_size: int = 64,
    budget_s: float = 1.0,
    example: Mapping[str, Array] | None = None,
    tolerance: float = 0.1,
) -> int:
    """The batch size to serve ``runtime`` with, from a short measurement (about ``budget_s``).

    Measures samples/s at batch sizes 1, 2, 4, … ``max_batch_size`` (see
    ``measure_batch_sizes``) and returns the largest size whose median throughput is
    within ``tolerance`` of the best: bigger batches are not always faster on a CPU, but
    when they are about as fast they also save the server a thread wake-up per batch.
    A model whose inputs have a fixed leading dimension cannot be batched: 1.
    """
    if not 0 <= tolerance < 1:
        raise InvalidInput(f"tolerance must be in [0, 1), got {tolerance}")
    if not all(spec.shape[:1] == (-1,) for spec in runtime.signature.inputs):
        _check_budget(max_batch_size, budget_s)
        return 1
    rates = measure_batch_sizes(
        runtime,
        max_batch_size=max_batch_size,
        budget_s=budget_s,
        example=example,
    )
    best = max(rates.values())
    chosen = max(size for size, rate in rates.items() if rate >= (1 - tolerance) * best)
    log.info(
        "batch size %d (samples/s by batch size: %s)",
        chosen,
        ", ".join(f"{size}: {rate:,.0f}" for size, rate in rates.items()),
    )
    return chosen


def measure_batch_sizes(
    runtime: Runtime,
    *,
    max_batch_size: int = 64,
    budget_s: float = 1.0,
    example: Mapping[str, Array] | None = None,
) -> dict[int, float]:
    """Median samples/s of ``runtime`` at batch sizes 1, 2, 4, … ``max_batch_size``.

    Inputs are zeros shaped by the signature; variable dimensions other than the batch take
    their size from ``example`` (the version's example inputs) when given, else 1. Each size
    is warmed and timed once, smallest first (a size the model fails on ends the list, and
    so does spending half the budget); then rounds visit every size in turn, alternating
    the order, each running a burst of calls, until ``budget_s`` is spent. Interleaving
    spreads any load on the machine over all sizes alike, and the median of the bursts
    ignores the odd stall. The time taken is about ``budget_s``, plus at most one burst
    or one call of the largest size. Failing at batch size 1 raises ``TorchopsError``.
    """
    _check_budget(max_batch_size, budget_s)
    import torch

    # apply torch's thread count to this thread's OpenMP / MKL settings: a worker thread
    # (the server calibrates in one) can otherwise run with their default, every core, and
    # on a busy machine each parallel op then waits for a core (measured: 30-100 ms calls
    # of a tiny MLP) while the compute thread, which sets its count, never does
    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    deadline = start + budget_s
    inputs: dict[int, dict[str, Array]] = {}
    per_call: dict[int, float] = {}  # latest estimate of one call's seconds
    rates: dict[int, list[float]] = {}
    for size in _candidate_sizes(max_batch_size):
        batch = _zeros(runtime, size, example)
        try:
            runtime.predict_batch(batch)  # warm this shape
            elapsed = _time_calls(runtime, batch, 1)
        except Exception as exc:
            if size == 1:
                raise TorchopsError(
                    f"cannot calibrate the batch size: the model fails on zero inputs "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            log.info("calibration stops at batch size %d: %s", size, exc)
            break
        inputs[size], per_call[size], rates[size] = batch, elapsed, [size / elapsed]
        if time.perf_counter() - start >= budget_s / 2:
            break  # no time left to measure bigger (slower) batches properly
    sizes = list(inputs)
    burst_s = budget_s / (_ROUNDS * len(sizes))
    reverse = False
    while time.perf_counter() < deadline:
        for size in reversed(sizes) if reverse else sizes:
            if time.perf_counter() >= deadline:
                break
            calls = max(1, min(_MAX_BURST_CALLS, round(burst_s / per_call[size])))
            elapsed = _time_calls(runtime, inputs[size], calls)
            per_call[size] = elapsed / calls
            rates[size].append(size * calls / elapsed)
        reverse = not reverse
    return {size: statistics.median(samples) for size, samples in rates.items()}


# rounds the budget aims for: many short bursts, so that the median of each size shrugs
# off the bursts another process interrupted
_ROUNDS = 25
_MAX_BURST_CALLS = 10_000


def _check_budget(max_batch_size: int, budget_s: float) -> None:
    if max_batch_size < 1:
        raise InvalidInput(f"max_batch_size must be at least 1, got {max_batch_size}")
    if not budget_s > 0:
        raise InvalidInput(f"the calibration budget must be positive, got {budget_s} s")


def _candidate_sizes(max_batch_size: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def _time_calls(runtime: Runtime, inputs: dict[str, Array], calls: int) -> float:
    """Seconds that ``calls`` runs of ``inputs`` take (never 0, for a too-coarse clock)."""
    start = time.perf_counter()
    for _ in range(calls):
        runtime.predict_batch(inputs)
    return max(time.perf_counter() - start, 1e-9)


def _zeros(runtime: Runtime, batch: int, example: Mapping[str, Array] | None) -> dict[str, Array]:
    inputs: dict[str, Any] = {}
    for spec in runtime.signature.inputs:
        shape = list(spec.shape)
        known = example[spec.name].shape if example is not None and spec.name in example else None
        for i, dim in enumerate(shape):
            if i == 0 and dim == -1:
                shape[0] = batch
            elif dim == -1:
                shape[i] = int(known[i]) if known is not None and i < len(known) else 1
        inputs[spec.name] = np.zeros(shape, dtype=numpy_dtype(datatype_of(spec.dtype)))
    return inputs
