from __future__ import annotations

from array import array

import numpy as np
import pytest

from torchops.monitoring._batches import Batch
from torchops.monitoring._capture import Capture


def _out(rows: int) -> dict[str, np.ndarray]:
    return {"output": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)}


def test_numbers_and_start_times_are_kept_in_machine_arrays_until_a_client_id_comes() -> None:
    capture = Capture.open("m", 1, None, inputs=False, capacity=2)
    capture.add([7, 8], None, [1.0, 1.5], 2.0, 1e9, _out(2), None, 2, 16)
    capture.add((9,), None, (1.75,), 2.5, 1e9, _out(1), None, 1, 8)
    assert isinstance(capture.ids, array) and capture.ids.typecode == "q"
    assert capture.ids.tolist() == [7, 8, 9]
    assert isinstance(capture.started, array) and capture.started.tolist() == [1.0, 1.5, 1.75]
    # a client's id turns the ids into a list, with nothing lost or repeated
    capture.add([10, "client-a", 11], None, [3.0, 3.0, 3.0], 3.5, 1e9, _out(3), None, 3, 24)
    assert capture.ids == [7, 8, 9, 10, "client-a", 11]
    capture.add([12], None, [4.0], 4.5, 1e9, _out(1), None, 1, 8)
    assert capture.ids[-1] == 12 and len(capture.started) == 7
    batch = Batch.assemble(capture, "srv")
    assert batch.row_ids() == [*(f"srv-{n}" for n in (7, 8, 9, 10)), "client-a", "srv-11", "srv-12"]
    np.testing.assert_allclose(batch.latency, [1.0, 0.5, 0.75, 0.5, 0.5, 0.5, 0.5])
    # the rows were copied into buffers made for 2 rows and grown as they came
    expected = np.concatenate([_out(n)["output"] for n in (2, 1, 3, 1)])
    np.testing.assert_array_equal(batch.outputs["output"], expected)
    assert capture.outputs["output"].shape == (8, 2)
    # and the model batches come back as they were given (feedback looks among them)
    assert [b.size for b in capture.batches()] == [2, 1, 3, 1]
    np.testing.assert_array_equal(capture.batches()[2].outputs["output"], _out(3)["output"])


def test_a_number_beyond_int64_is_kept_and_then_refused_by_the_writer() -> None:
    capture = Capture.open("m", 1, None, inputs=False, capacity=2)
    capture.add([1], None, [0.0], 1.0, 1e9, _out(1), None, 1, 8)
    capture.add([2**63], None, [0.0], 1.0, 1e9, _out(1), None, 1, 8)
    assert capture.ids == [1, 2**63]
    with pytest.raises(OverflowError):
        Batch.assemble(capture, "srv")


def test_start_times_that_are_not_numbers_leave_the_capture_as_it_was() -> None:
    capture = Capture.open("m", 1, None, inputs=False, capacity=2)
    capture.add([1], None, [0.0], 1.0, 1e9, _out(1), None, 1, 8)
    with pytest.raises(TypeError):
        capture.add([2], None, ["soon"], 1.0, 1e9, _out(1), None, 1, 8)  # type: ignore[list-item]
    assert capture.ids.tolist() == [1] and capture.started.tolist() == [0.0]  # type: ignore[union-attr]
    assert capture.size == 1 and len(capture.requests) == 1
    np.testing.assert_array_equal(capture.columns()[0]["output"], _out(1)["output"])
