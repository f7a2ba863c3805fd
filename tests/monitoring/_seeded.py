"""A registry holding a digits classifier and its served history: predictions on clean test
digits, then on intensity-inverted ones, with feedback — written through the real
``ObservationWriter`` and ``FeedbackStore``, as a server's monitor would find them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from torchops.monitoring.feedback import FeedbackStore
from torchops.monitoring.observations import Observation, ObservationWriter
from torchops.registry import Registry
from torchops.registry.store import utcnow
from torchops.types import Array, ModelVersion

LABELS = [str(i) for i in range(10)]


@dataclass(frozen=True)
class DigitsData:
    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    weight: Array
    bias: Array

    def logits(self, x: Array) -> Array:
        return np.asarray(x @ self.weight.T + self.bias, dtype=np.float32)

    def module(self) -> torch.nn.Module:
        linear = torch.nn.Linear(64, 10)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(self.weight))
            linear.bias.copy_(torch.from_numpy(self.bias))
        return linear.eval()


@cache
def digits() -> DigitsData:
    """Pixels scaled to [0, 1]; a logistic regression copied into ``nn.Linear(64, 10)``."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    fitted = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return DigitsData(
        x_train,
        y_train.astype(np.int64),
        x_test,
        y_test.astype(np.int64),
        fitted.coef_.astype(np.float32),
        fitted.intercept_.astype(np.float32),
    )


def register_digits(registry: Registry, *, reference: bool = True) -> ModelVersion:
    data = digits()
    return registry.register(
        "digits",
        data.module(),
        torch.from_numpy(data.x_test[:8]),
        formats=("torchscript",),
        labels=LABELS,
        reference=data.x_train[:500] if reference else None,
    )


@dataclass(frozen=True)
class Served:
    """What ``serve`` wrote: request ids in order, their true and predicted classes."""

    ids: list[str]
    y_true: Array
    y_pred: Array
    times: list[datetime]


def serve(
    registry: Registry,
    version: int,
    x: Array,
    y: Array,
    *,
    prefix: str,
    start: datetime | None = None,
    step: timedelta = timedelta(seconds=2),
    feedback: bool = True,
    model: str = "digits",
) -> Served:
    """Record one observation per row (as the server does) and, with ``feedback``, its label."""
    data = digits()
    logits = data.logits(x)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    proba = exp / exp.sum(axis=1, keepdims=True)
    start = start if start is not None else utcnow() - timedelta(hours=1)
    input_name = registry.get(f"{model}:{version}").signature.inputs[0].name
    writer = ObservationWriter(registry.engine)
    ids, times = [], []
    for i in range(len(x)):
        at = start + step * i
        request_id = f"{prefix}-{i}"
        accepted = writer.put(
            Observation(
                request_id=request_id,
                model=model,
                version=version,
                at=at,
                latency_s=0.001,
                outputs={"output": logits[i : i + 1]},
                inputs={input_name: x[i : i + 1]},
                prediction=int(logits[i].argmax()),
                proba=proba[i].tolist(),
            )
        )
        assert accepted
        ids.append(request_id)
        times.append(at)
    writer.close()
    assert writer.written == len(x)
    if feedback:
        result = FeedbackStore(registry.engine).add_many(
            model, list(zip(ids, (int(t) for t in y), strict=True))
        )
        assert result.accepted == len(x), result.errors
    return Served(ids, np.asarray(y), logits.argmax(axis=1), times)
