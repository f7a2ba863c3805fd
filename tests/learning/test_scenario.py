"""The quick drift scenario of bench/learning.py: recovery, safe promotions, poisoning."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "learning.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torchops_bench_learning", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the benchmark uses; small models gain nothing from more
    try:
        yield load_bench()
    finally:
        torch.set_num_threads(threads)


def test_quick_drift_scenario_recovers_and_never_promotes_a_worse_model(
    bench: ModuleType,
) -> None:
    results, poisoned, _, sc = bench.run(
        [0], river=False, full_retrain=False, poisoned_seeds=[0], progress=lambda _: None
    )
    (result,) = results
    held = result.test_at_recovery
    # the static model is useless on inverted digits; online learning recovers
    assert held["static"] < 0.2
    assert held["torchops"] >= 0.9 * held["full retrain"], held
    assert (
        result.prequential["torchops"].after(sc.t0)
        > result.prequential["static"].after(sc.t0) + 0.4
    )
    assert result.promotions, "the drift should have produced at least one promotion"
    for promotion in result.promotions:
        assert promotion.child_test >= promotion.parent_test, promotion
        assert promotion.p_value is not None and promotion.p_value < sc.gate.alpha
    # flipped labels from t1 on: the gate's retention check refuses every challenger
    (attacked,) = poisoned
    assert attacked.refused > 0
    assert attacked.promotions == []
    assert attacked.final_test == attacked.first_test > 0.9
