"""Monitoring fixtures: a registry (SQLite or PostgreSQL) with a classifier and a regressor."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import Engine

from torchops.monitoring.observations import Observation
from torchops.registry import Registry
from torchops.registry.store import utcnow
from torchops.types import ModelVersion

#: ``make_observation(model, request_id, version=1, **fields)``
MakeObservation = Callable[..., Observation]


@pytest.fixture
def engine(registry: Registry) -> Engine:
    return registry.engine


@pytest.fixture
def classifier(registry: Registry) -> ModelVersion:
    """``clf`` v1: 4 float inputs, 3 classes labelled a, b, c."""
    torch.manual_seed(0)
    return registry.register(
        "clf",
        torch.nn.Linear(4, 3),
        torch.zeros(2, 4),
        formats=("torchscript",),
        labels=["a", "b", "c"],
    )


@pytest.fixture
def regressor(registry: Registry) -> ModelVersion:
    """``reg`` v1: 4 float inputs, 2 regression outputs per row."""
    torch.manual_seed(0)
    return registry.register(
        "reg", torch.nn.Linear(4, 2), torch.zeros(2, 4), formats=("torchscript",), task="regression"
    )


@pytest.fixture
def make_observation() -> MakeObservation:
    def make(
        model: str,
        request_id: str,
        version: int = 1,
        *,
        at: datetime | None = None,
        prediction: Any = 0,
        inputs: dict[str, np.ndarray[Any, Any]] | None = None,
        outputs: dict[str, np.ndarray[Any, Any]] | None = None,
    ) -> Observation:
        seed = sum(request_id.encode())
        return Observation(
            request_id=request_id,
            model=model,
            version=version,
            at=at if at is not None else utcnow(),
            latency_s=0.001,
            outputs=outputs
            if outputs is not None
            else {"output": np.full((1, 3), seed % 7, dtype=np.float32)},
            inputs=inputs
            if inputs is not None
            else {"input": np.arange(4, dtype=np.float32).reshape(1, 4) + seed},
            prediction=prediction,
            proba=[0.5, 0.25, 0.25],
        )

    return make
