"""Dynamic batching on a real TorchScript runtime."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from torch import nn

from torchops.errors import DeadlineExceeded, InvalidInput, Overloaded, TorchopsError, Unavailable
from torchops.runtime import Runtime, load_runtime
from torchops.serving.batcher import Batcher, calibrate_batch_size, measure_batch_sizes
from torchops.serving.metrics import ServingMetrics
from torchops.types import Array, Signature, TensorSpec

T = TypeVar("T")


class Net(nn.Module):
    """A small MLP that refuses rows holding a value below -100 (a poisoned request)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < -100).any()):
            raise ValueError("poisoned input")
        return self.fc(x)


class Collapse(nn.Module):
    """Ignores the batch: one row, the sum over all rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0, keepdim=True)


class Capped(nn.Module):
    """Fails on batches larger than 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise ValueError("batch too large")
        return x * 2


def _runtime(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Runtime:
    signature = Signature(
        inputs=(TensorSpec("x", "float32", in_shape),),
        outputs=(TensorSpec("y", "float32", out_shape),),
    )
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return load_runtime("torchscript", buffer.getvalue(), signature)


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return _runtime(Net(), (-1, 8), (-1, 3))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _rows(n: int, seed: int) -> dict[str, Array]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)}


def _batches(metrics: ServingMetrics) -> tuple[float, float]:
    """(number of batches run, rows run) as the metrics recorded them."""
    labels = {"model": "m", "version": "1"}
    count = metrics.registry.get_sample_value("torchops_batch_size_count", labels)
    total = metrics.registry.get_sample_value("torchops_batch_size_sum", labels)
    return count or 0.0, total or 0.0


def _batcher(runtime: Runtime, **kwargs: Any) -> tuple[Batcher, ServingMetrics]:
    metrics = ServingMetrics()
    return Batcher(runtime, model="m", version=1, metrics=metrics, **kwargs), metrics


async def _queued(batcher: Batcher, requests: list[dict[str, Array]], **kw: Any) -> list[Any]:
    """Queue every request before the compute thread starts, then start it."""
    tasks = [asyncio.ensure_future(batcher.submit(r, **kw)) for r in requests]
    await asyncio.sleep(0)
    assert batcher.queue_depth == len(requests)
    batcher.start()
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_batched_results_equal_unbatched(runtime: Runtime) -> None:
    requests = [_rows(1 + i % 3, seed=i) for i in range(30)]
    batcher, metrics = _batcher(runtime, max_batch_size=16)
    try:
        results = _run(_queued(batcher, requests))
    finally:
        batcher.close()
    count, rows = _batches(metrics)
    assert rows == sum(r["x"].shape[0] for r in requests)
    assert count < len(requests)  # they did run together
    for request, result in zip(requests, results, strict=True):
        expected = runtime.predict_batch(request)["y"]
        assert result["y"].shape == expected.shape
        np.testing.assert_allclose(result["y"], expected, rtol=1e-5, atol=1e-6)


def test_the_observer_sees_each_batch_once_with_its_named_requests(runtime: Runtime) -> None:
    seen: list[tuple[list[Any], Any, int, Array]] = []

    def observer(ids: Any, rows: Any, started: Any, inputs: Any, outputs: Any) -> None:
        assert len(started) == len(ids)
        seen.append((list(ids), rows, inputs["x"].shape[0], outputs["y"]))

    requests = [_rows(1, seed=0), _rows(2, seed=1), _rows(1, seed=2), _rows(1, seed=3)]
    batcher, _ = _batcher(runtime, max_batch_size=16, observer=observer)

    async def main() -> list[Any]:
        names: list[int | str | None] = [5, "client", None, 6]
        tasks = [
            asyncio.ensure_future(batcher.submit(r, request_id=n, started=time.monotonic()))
            for r, n in zip(requests, names, strict=True)
        ]
        await asyncio.sleep(0)
        batcher.start()
        return await asyncio.gather(*tasks)

    try:
        results = _run(main())
    finally:
        batcher.close()
    # one batch; the request without a name is answered but not observed
    assert [(ids, rows, n) for ids, rows, n, _ in seen] == [([5, "client", 6], [1, 2, 1], 4)]
    observed = seen[0][3]
    np.testing.assert_array_equal(observed[1:3], results[1]["y"])
    np.testing.assert_array_equal(observed[3:], results[3]["y"])


def test_the_observer_gets_row_counts_only_when_a_request_has_several(
    runtime: Runtime,
) -> None:
    seen: list[tuple[list[Any], Any]] = []

    def observer(ids: Any, rows: Any, started: Any, inputs: Any, outputs: Any) -> None:
        seen.append((list(ids), rows))

    batcher, _ = _batcher(runtime, max_batch_size=16, observer=observer)

    async def batch(sizes: list[int], first: int) -> None:
        tasks = [
            asyncio.ensure_future(batcher.submit(_rows(n, seed=i), request_id=first + i))
            for i, n in enumerate(sizes)
        ]
        await asyncio.sleep(0)
        batcher.start()
        await asyncio.gather(*tasks)

    try:
        _run(batch([1, 1, 1], 0))
        _run(batch([2, 1], 10))
    finally:
        batcher.close()
    assert seen == [([0, 1, 2], None), ([10, 11], [2, 1])]


def test_an_empty_batch_is_refused() -> None:
    batcher = Batcher(_runtime(Capped(), (-1, 3), (-1, 3)), model="m", version=1)
    with pytest.raises(InvalidInput, match=r"empty batch \(0 rows\)"):
        _run(batcher.submit({"x": np.zeros((0, 3), np.float32)}))


def test_a_failing_observer_does_not_fail_the_batch(runtime: Runtime) -> None:
    def observer(*args: Any) -> None:
        raise RuntimeError("observer bug")

    batcher, _ = _batcher(runtime, observer=observer)

    async def main() -> dict[str, Array]:
        batcher.start()
        return await batcher.submit(_rows(1, seed=0), request_id=1)

    try:
        result = _run(main())
    finally:
        batcher.close()
    assert result["y"].shape[0] == 1


def test_max_batch_size_counts_rows(runtime: Runtime) -> None:
    requests = [_rows(3, seed=i) for i in range(10)] + [_rows(10, seed=99)]
    batcher, metrics = _batcher(runtime, max_batch_size=8)
    try:
        results = _run(_queued(batcher, requests))
    finally:
        batcher.close()
    assert all(not isinstance(r, BaseException) for r in results)
    # 3 + 3 rows fit in 8, a third request would not; the 10-row request runs alone
    assert _batches(metrics) == (6, 40)
    labels = {"model": "m", "version": "1", "le": "8.0"}
    assert metrics.registry.get_sample_value("torchops_batch_size_bucket", labels) == 5


def test_concurrent_submits_form_batches(runtime: Runtime) -> None:
    async def main() -> list[dict[str, Array]]:
        batcher.start()
        return await asyncio.gather(*(batcher.submit(_rows(1, seed=i)) for i in range(300)))

    batcher, metrics = _batcher(runtime, max_batch_size=32)
    try:
        results = _run(main())
    finally:
        batcher.close()
    count, rows = _batches(metrics)
    assert rows == 300 and count < 300
    expected = runtime.predict_batch(_rows(1, seed=7))["y"]
    np.testing.assert_allclose(results[7]["y"], expected, rtol=1e-5, atol=1e-6)


def test_a_failing_request_fails_alone(runtime: Runtime) -> None:
    requests = [_rows(2, seed=i) for i in range(6)]
    requests[3]["x"][1, 4] = -1000.0
    batcher, _ = _batcher(runtime)
    try:
        results = _run(_queued(batcher, requests))
    finally:
        batcher.close()
    error = results[3]
    assert isinstance(error, Exception) and not isinstance(error, TorchopsError)
    assert "poisoned input" in str(error)
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        if i != 3:
            expected = runtime.predict_batch(request)["y"]
            np.testing.assert_allclose(result["y"], expected, rtol=1e-5, atol=1e-6)


def test_full_queue_is_overloaded(runtime: Runtime) -> None:
    async def main() -> list[Any]:
        tasks = [asyncio.ensure_future(batcher.submit(_rows(1, seed=i))) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match=r"2 requests are queued \(max_queue=2\)"):
            await batcher.submit(_rows(1, seed=9))
        batcher.start()
        return await asyncio.gather(*tasks)

    batcher, _ = _batcher(runtime, max_queue=2)
    try:
        assert len(_run(main())) == 2
    finally:
        batcher.close()


def test_deadlines(runtime: Runtime) -> None:
    async def main() -> list[Any]:
        with pytest.raises(DeadlineExceeded, match="before it was queued"):
            await batcher.submit(_rows(1, seed=0), deadline=time.monotonic() - 1)
        deadline = time.monotonic() + 0.05
        late = asyncio.ensure_future(batcher.submit(_rows(1, seed=1), deadline=deadline))
        fine = asyncio.ensure_future(batcher.submit(_rows(1, seed=2), deadline=None))
        while time.monotonic() <= deadline:  # let the first one expire in the queue
            await asyncio.sleep(0.01)
        batcher.start()
        return await asyncio.gather(late, fine, return_exceptions=True)

    batcher, metrics = _batcher(runtime)
    try:
        late, fine = _run(main())
    finally:
        batcher.close()
    assert isinstance(late, DeadlineExceeded) and "in the queue" in str(late)
    assert fine["y"].shape == (1, 3)
    assert _batches(metrics) == (1, 1)


def test_cancelled_requests_are_skipped(runtime: Runtime) -> None:
    async def main() -> dict[str, Array]:
        gone = asyncio.ensure_future(batcher.submit(_rows(4, seed=0)))
        kept = asyncio.ensure_future(batcher.submit(_rows(1, seed=1)))
        await asyncio.sleep(0)
        gone.cancel()
        batcher.start()
        return await kept

    batcher, metrics = _batcher(runtime)
    try:
        assert _run(main())["y"].shape == (1, 3)
    finally:
        batcher.close()
    assert _batches(metrics) == (1, 1)


def test_drain_then_refuse(runtime: Runtime) -> None:
    async def main() -> None:
        tasks = [asyncio.ensure_future(batcher.submit(_rows(1, seed=i))) for i in range(5)]
        await asyncio.sleep(0)
        with pytest.raises(DeadlineExceeded, match=r"did not drain within 0\.01 s: 5 queued"):
            await batcher.drain(timeout=0.01)  # nothing runs: the thread is not started
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit(_rows(1, seed=9))
        batcher.start()
        await batcher.drain()
        assert _batches(metrics) == (1, 5)  # everything queued has run
        assert batcher.queue_depth == 0 and batcher.in_flight == 0
        assert all(r["y"].shape == (1, 3) for r in await asyncio.gather(*tasks))

    batcher, metrics = _batcher(runtime)
    try:
        _run(main())
    finally:
        batcher.close()


def test_close_fails_queued_requests(runtime: Runtime) -> None:
    async def main() -> Any:
        task = asyncio.ensure_future(batcher.submit(_rows(1, seed=0)))
        await asyncio.sleep(0)
        batcher.close()
        return await asyncio.gather(task, return_exceptions=True)

    batcher, _ = _batcher(runtime)
    (result,) = _run(main())
    assert isinstance(result, Unavailable) and "unloaded" in str(result)
    with pytest.raises(Unavailable, match="closed"):
        batcher.start()


def test_model_that_ignores_the_batch_dim_runs_requests_alone() -> None:
    runtime = _runtime(Collapse(), (-1, 4), (-1, 4))
    requests = [{"x": np.full((2, 4), i, dtype=np.float32)} for i in range(4)]
    batcher, _ = _batcher(runtime)
    try:
        results = _run(_queued(batcher, requests))
    finally:
        batcher.close()
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], np.full((1, 4), 2 * i, dtype=np.float32))


def test_fixed_leading_dim_is_never_stacked() -> None:
    runtime = _runtime(Capped(), (2, 3), (2, 3))
    requests = [{"x": np.full((2, 3), i, dtype=np.float32)} for i in range(3)]
    batcher, metrics = _batcher(runtime)
    try:
        results = _run(_queued(batcher, requests))
    finally:
        batcher.close()
    assert _batches(metrics) == (3, 3)
    assert [r["y"][0, 0] for r in results] == [0, 2, 4]


def test_inputs_must_share_their_batch_size() -> None:
    batcher = Batcher(_runtime(Capped(), (-1, 3), (-1, 3)), model="m", version=1)
    request = {"x": np.zeros((2, 3), np.float32), "z": np.zeros((3, 3), np.float32)}
    with pytest.raises(InvalidInput, match="share their batch size"):
        _run(batcher.submit(request))
    with pytest.raises(InvalidInput, match=r"share their batch size \(dim 0\), got none"):
        _run(batcher.submit({}))
    with pytest.raises(InvalidInput, match="max_batch_size must be at least 1"):
        Batcher(batcher.runtime, model="m", version=1, max_batch_size=0)


def test_max_delay_waits_for_a_fuller_batch(runtime: Runtime) -> None:
    async def main() -> list[dict[str, Array]]:
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_rows(1, seed=0)))
        await asyncio.sleep(0.001)  # well inside the delay window
        second = asyncio.ensure_future(batcher.submit(_rows(1, seed=1)))
        return list(await asyncio.gather(first, second))

    batcher, metrics = _batcher(runtime, max_delay_ms=2000, max_batch_size=2)
    try:
        _run(main())
    finally:
        batcher.close()
    assert _batches(metrics) == (1, 2)  # the batch filled up before the delay ran out


def test_close_while_waiting_for_a_fuller_batch(runtime: Runtime) -> None:
    async def main() -> Any:
        batcher.start()
        task = asyncio.ensure_future(batcher.submit(_rows(1, seed=0)))
        while batcher.queue_depth == 0:  # queued, and the thread waits for more
            await asyncio.sleep(0)
        batcher.close()
        return await asyncio.gather(task, return_exceptions=True)

    batcher, metrics = _batcher(runtime, max_delay_ms=60_000, max_batch_size=4)
    (result,) = _run(main())
    assert isinstance(result, Unavailable)
    assert _batches(metrics) == (0, 0)


class Pairwise(nn.Module):
    """Every row meets every other: the cost of a batch grows with its size squared."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(0) * x.unsqueeze(1)).sum(1)


class Counting(Runtime):
    """Wraps a real runtime, counts the batches it runs and sleeps ``pause`` seconds per call."""

    format = "torchscript"

    def __init__(self, inner: Runtime, pause: float = 0.0) -> None:
        super().__init__(inner.signature)
        self.inner = inner
        self.pause = pause
        self.calls = 0

    def _run(self, arrays: list[Array]) -> list[Array]:
        self.calls += 1
        if self.pause:
            time.sleep(self.pause)
        return [self.inner.predict_batch({"x": arrays[0]})["y"]]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Calibrate on one torch thread, as a pinned server does: with two threads on a busy
    two-core machine, an op big enough to go parallel can stall for a scheduler tick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_calibration_takes_the_largest_batch_when_throughput_keeps_rising(
    runtime: Runtime,
) -> None:
    # a tiny MLP: the per-call overhead dominates, so samples/s grows with the batch
    assert calibrate_batch_size(runtime, max_batch_size=32, budget_s=0.3) == 32
    fresh = _runtime(Net(), (-1, 8), (-1, 3))
    assert calibrate_batch_size(fresh, max_batch_size=24, budget_s=0.2) == 24


@pytest.mark.usefixtures("one_thread")
def test_calibration_avoids_batches_whose_cost_is_superlinear() -> None:
    runtime = _runtime(Pairwise(), (-1, 1024), (-1, 1024))
    rates = measure_batch_sizes(runtime, max_batch_size=64, budget_s=0.3)
    assert list(rates) == [1, 2, 4, 8, 16, 32, 64]
    assert max(rates, key=rates.__getitem__) < 64
    assert calibrate_batch_size(runtime, max_batch_size=64, budget_s=0.3) <= 16


@pytest.mark.usefixtures("one_thread")
def test_calibration_prefers_bigger_batches_within_the_tolerance(runtime: Runtime) -> None:
    pairwise = _runtime(Pairwise(), (-1, 1024), (-1, 1024))
    # every size is within 99.99% of the best: the largest wins
    assert calibrate_batch_size(pairwise, max_batch_size=64, budget_s=0.3, tolerance=0.9999) == 64
    with pytest.raises(InvalidInput, match=r"tolerance must be in \[0, 1\), got 1"):
        calibrate_batch_size(runtime, tolerance=1)
    with pytest.raises(InvalidInput, match="budget must be positive"):
        calibrate_batch_size(runtime, budget_s=0)
    with pytest.raises(InvalidInput, match="max_batch_size must be at least 1"):
        calibrate_batch_size(runtime, max_batch_size=0)


def test_calibration_keeps_to_its_budget(runtime: Runtime) -> None:
    # every call takes at least 5 ms, so 0.1 s leave room for at most 20 calls, plus the
    # one burst (one call here) that may overrun the budget
    slow = Counting(runtime, pause=0.005)
    rates = measure_batch_sizes(slow, max_batch_size=1024, budget_s=0.1)
    assert 2 <= slow.calls <= 21
    assert 1 in rates and 1024 not in rates  # half the budget went before the big sizes
    # a fixed cost per call: samples/s grows with the batch, so the largest measured wins
    assert calibrate_batch_size(Counting(runtime, 0.005), max_batch_size=8, budget_s=0.1) == 8


def test_calibration_of_edge_cases(runtime: Runtime) -> None:
    assert calibrate_batch_size(runtime, max_batch_size=1, budget_s=0.01) == 1
    capped = _runtime(Capped(), (-1, 3), (-1, 3))  # fails past 2 rows: the search stops there
    assert list(measure_batch_sizes(capped, max_batch_size=64, budget_s=0.05)) == [1, 2]
    assert calibrate_batch_size(capped, max_batch_size=64, budget_s=0.05) in (1, 2)
    fixed = Counting(_runtime(Capped(), (2, 3), (2, 3)))  # no batch dimension to grow
    assert calibrate_batch_size(fixed, max_batch_size=64, budget_s=0.05) == 1
    assert fixed.calls == 0


def test_calibrate_raises_when_the_model_cannot_run_zeros() -> None:
    runtime = _runtime(Capped(), (-1, 3), (-1, 3))
    poisoned = _runtime(Net(), (-1, 8), (-1, 3))

    class Refuses(Runtime):
        """A runtime whose model refuses every batch of zeros (it needs a poisoned row)."""

        format = "torchscript"

        def __init__(self) -> None:
            super().__init__(poisoned.signature)

        def _run(self, arrays: list[Array]) -> list[Array]:
            return [poisoned.predict_batch({"x": arrays[0] - 1000})["y"]]

    with pytest.raises(TorchopsError, match="fails on zero inputs"):
        calibrate_batch_size(Refuses(), budget_s=0.01)
    assert calibrate_batch_size(runtime, max_batch_size=2, budget_s=0.01) in (1, 2)
