"""Signature inference: names, dtypes, shapes with -1 for the batch, task and labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from torchops.errors import InvalidInput
from torchops.packaging.signature import normalize_examples, probe
from torchops.types import Signature, TensorSpec


class Masked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(4, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dense(features) * mask


class Pair(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum(dim=1)


class Named(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": x.mean(dim=1), "double": x * 2}


class Total(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def _signature(model: torch.nn.Module, example: Any, **kwargs: Any) -> Signature:
    names = kwargs.pop("input_names", None)
    return probe(model, normalize_examples(model, example, names), **kwargs).signature


def test_names_come_from_forward() -> None:
    sig = _signature(Masked(), (torch.randn(2, 4), torch.ones(2, 3)))
    assert sig.inputs == (
        TensorSpec("features", "float32", (-1, 4)),
        TensorSpec("mask", "float32", (-1, 3)),
    )
    assert sig.outputs == (TensorSpec("output", "float32", (-1, 3)),)
    assert sig.task == "other"
    assert sig.labels is None


def test_input_names_override_and_must_match_count() -> None:
    sig = _signature(Masked(), (torch.randn(2, 4), torch.ones(2, 3)), input_names=["a", "b"])
    assert sig.input_names == ("a", "b")
    with pytest.raises(InvalidInput, match="1 input_names given for 2 example inputs"):
        _signature(Masked(), (torch.randn(2, 4), torch.ones(2, 3)), input_names=["a"])


def test_mapping_is_put_in_forward_order() -> None:
    model = Masked()
    inputs = normalize_examples(
        model, {"mask": np.ones((2, 3), "float32"), "features": np.zeros((2, 4), "float32")}
    )
    assert list(inputs) == ["features", "mask"]
    with pytest.raises(InvalidInput, match="skip a parameter"):
        normalize_examples(model, {"mask": np.ones((2, 3), "float32")})


def test_mapping_with_its_own_names_keeps_its_order() -> None:
    inputs = normalize_examples(Masked(), {"b": torch.randn(2, 4), "a": torch.ones(2, 3)})
    assert list(inputs) == ["b", "a"]


def test_tuple_and_dict_outputs() -> None:
    pair = _signature(Pair(), torch.randn(3, 5))
    assert pair.outputs == (
        TensorSpec("output_0", "float32", (-1, 5)),
        TensorSpec("output_1", "float32", (-1,)),
    )
    named = _signature(Named(), torch.randn(3, 5))
    assert named.output_names == ("score", "double")
    renamed = _signature(Pair(), torch.randn(3, 5), output_names=["y", "total"])
    assert renamed.output_names == ("y", "total")
    with pytest.raises(InvalidInput, match="1 output_names given for 2 model outputs"):
        _signature(Pair(), torch.randn(3, 5), output_names=["y"])


def test_integer_and_bool_dtypes() -> None:
    sig = _signature(
        Masked(), (torch.randn(2, 4), torch.ones(2, 3)), input_names=["features", "mask"]
    )
    assert sig.inputs[0].dtype == "float32"
    emb = torch.nn.Embedding(5, 2)
    ids = _signature(emb, torch.tensor([[1, 2], [3, 4]]))
    assert ids.inputs == (TensorSpec("input", "int64", (-1, 2)),)
    assert ids.outputs == (TensorSpec("output", "float32", (-1, 2, 2)),)


def test_labels_make_a_classifier() -> None:
    model = torch.nn.Linear(4, 3)
    sig = _signature(model, torch.randn(2, 4), labels=["cat", "dog", "eel"])
    assert sig.task == "classification"
    assert sig.labels == ("cat", "dog", "eel")
    default = _signature(model, torch.randn(2, 4), task="classification")
    assert default.labels == ("0", "1", "2")
    assert _signature(model, torch.randn(2, 4), task="regression").labels is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": ["a", "b"]}, "2 labels given"),
        ({"labels": ["a", "a", "b"]}, "unique"),
        ({"labels": ["a", "b", "c"], "task": "regression"}, "only meaningful for classification"),
        ({"task": "ranking"}, "unknown task 'ranking'"),
    ],
)
def test_bad_task_or_labels(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        _signature(torch.nn.Linear(4, 3), torch.randn(2, 4), **kwargs)


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (torch.tensor(1.0), "scalar"),
        ((torch.randn(2, 4), torch.ones(3, 3)), "share their batch size"),
        (torch.randn(0, 4), "empty batch"),
        (torch.randn(2, 4, dtype=torch.bfloat16), "bfloat16 is not supported"),
        (np.array([["a", "b", "c", "d"]]), "not a numeric tensor"),
        ("not a tensor", "must be a tensor or a numpy array"),
    ],
)
def test_bad_examples(example: Any, message: str) -> None:
    model = Masked() if isinstance(example, tuple) else torch.nn.Linear(4, 3)
    with pytest.raises(InvalidInput, match=message):
        normalize_examples(model, example)


def test_example_of_the_wrong_shape_names_the_shapes() -> None:
    model = torch.nn.Linear(4, 3)
    with pytest.raises(
        InvalidInput, match=r"failed on the example inputs \(input: \[2, 5\] float32\)"
    ):
        _signature(model, torch.randn(2, 5))


def test_output_without_a_batch_dimension_is_refused() -> None:
    with pytest.raises(InvalidInput, match="outputs need the batch as their first dimension"):
        _signature(Total(), torch.randn(3, 2))


def test_single_row_example_is_probed_at_two_batch_sizes() -> None:
    found = probe(Pair(), normalize_examples(Pair(), torch.randn(1, 5)))
    assert [next(iter(x.values())).shape[0] for x, _ in found.cases] == [1, 2]
    assert found.signature.outputs[0].shape == (-1, 5)
