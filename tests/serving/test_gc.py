"""The server's cyclic GC settings: requests' objects are left to reference counting,
reference cycles are still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from torchops.serving.server import _settle_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


class _Node:
    other: _Node


def test_requests_in_flight_are_not_walked_every_few_hundred_objects(restore_gc: None) -> None:
    _settle_gc()
    assert gc.get_freeze_count() > 0  # what was loaded is out of the collections
    assert gc.get_threshold()[0] >= 10_000  # the default is 700


def test_reference_cycles_made_while_serving_are_still_freed(restore_gc: None) -> None:
    _settle_gc()
    young = gc.get_threshold()[0]
    freed: list[int] = []
    for i in range(young * 3):
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # garbage only the cyclic GC can free
        if i % 1000 == 0:
            weakref.finalize(a, freed.append, i)
    assert 0 in freed and 1000 in freed
    assert len(freed) >= young * 3 // 1000 // 2
