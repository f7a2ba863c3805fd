"""Fixtures: every conformance model packaged once per session, and a runtime for every
(model, format) pair."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from runtime_cases import MODELS, Case, build

from torchops.runtime import Runtime, load_runtime
from torchops.types import FORMATS

_CASES: dict[str, Case] = {}


def _case(name: str) -> Case:
    if name not in _CASES:
        _CASES[name] = build(name)
    return _CASES[name]


@pytest.fixture(scope="session", params=MODELS)
def case(request: pytest.FixtureRequest) -> Case:
    return _case(request.param)


@pytest.fixture(scope="session", params=FORMATS)
def runtime(request: pytest.FixtureRequest, case: Case) -> Iterator[Runtime]:
    fmt: str = request.param
    assert fmt in case.package.blobs, case.package.report(fmt)
    rt = load_runtime(fmt, case.package.blobs[fmt], case.package.signature)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def mlp_case() -> Case:
    return _case("mlp")


@pytest.fixture(scope="session")
def two_inputs_case() -> Case:
    return _case("two_inputs")
