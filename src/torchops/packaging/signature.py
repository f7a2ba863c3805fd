"""Infer a model's ``Signature`` from example inputs and one run of the model."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

from torchops.errors import InvalidInput
from torchops.refs import validate_name
from torchops.runtime._torch import flatten_outputs
from torchops.types import Array, Signature, Task, TensorSpec

__all__ = ["Probe", "forward_names", "normalize_examples", "probe", "rebatch"]

#: torch dtypes a signature may carry, by their numpy names
DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
TASKS: tuple[str, ...] = get_args(Task)


def forward_names(model: torch.nn.Module) -> list[str] | None:
    """The positional parameter names of ``model.forward`` (without ``self``), if known."""
    if isinstance(model, torch.jit.ScriptModule):
        try:
            forward: Any = model.forward
            return [arg.name for arg in forward.schema.arguments[1:]]
        except (AttributeError, RuntimeError):
            return None
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds]


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InvalidInput(f"example input {name!r}: {value.dtype} is not a numeric tensor")
        tensor = torch.from_numpy(np.array(value, copy=True))
    else:
        raise InvalidInput(
            f"example input {name!r} must be a tensor or a numpy array, got {type(value).__name__}"
        )
    if tensor.dtype not in DTYPES:
        supported = ", ".join(DTYPES.values())
        raise InvalidInput(f"example input {name!r}: {tensor.dtype} is not supported ({supported})")
    if tensor.dim() == 0:
        raise InvalidInput(f"example input {name!r} is a scalar; inputs need a batch dimension")
    return tensor.contiguous()


def normalize_examples(
    model: torch.nn.Module,
    example_inputs: Any,
    input_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Example inputs as an ordered mapping of input name → tensor, in call order.

    A tensor, an array or a tuple of them is passed positionally and named after
    ``forward``'s parameters (``input_names`` overrides). A mapping names its inputs; its
    keys are put in ``forward``'s order when they are ``forward``'s first parameters,
    else the mapping's order is the call order.
    """
    params = forward_names(model) or []
    if isinstance(example_inputs, Mapping):
        keys = [str(k) for k in example_inputs]
        values = list(example_inputs.values())
        if set(keys) <= set(params):
            if set(keys) != set(params[: len(keys)]):
                raise InvalidInput(
                    f"example inputs {keys} skip a parameter of forward({', '.join(params)})"
                )
            values = [example_inputs[k] for k in params[: len(keys)]]
            keys = params[: len(keys)]
        names = keys
        if input_names is not None and list(input_names) != keys:
            raise InvalidInput(
                f"input_names {list(input_names)} contradict the example's names {keys}"
            )
    else:
        if isinstance(example_inputs, (tuple, list)):
            values = list(example_inputs)
        else:
            values = [example_inputs]
        if not values:
            raise InvalidInput("no example inputs given")
        if input_names is not None:
            names = [str(n) for n in input_names]
            if len(names) != len(values):
                raise InvalidInput(
                    f"{len(names)} input_names given for {len(values)} example inputs"
                )
        else:
            names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(values))]
    if len(set(names)) != len(names):
        raise InvalidInput(f"input names must be unique, got {names}")
    tensors = {
        validate_name(n, "input name"): _as_tensor(n, v) for n, v in zip(names, values, strict=True)
    }
    sizes = {n: int(t.shape[0]) for n, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise InvalidInput(f"example inputs must share their batch size, got {sizes}")
    if next(iter(sizes.values())) == 0:
        raise InvalidInput("example inputs have an empty batch; give at least one row")
    return tensors


def rebatch(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same inputs at a second batch size: all rows but the last, or a batch of 1
    repeated twice. Running both shows which output dimensions follow the batch."""
    n = int(next(iter(inputs.values())).shape[0])
    if n >= 2:
        return {k: v[: n - 1].contiguous() for k, v in inputs.items()}
    return {k: torch.cat([v, v]) for k, v in inputs.items()}


def _run(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs.values())
    except Exception as exc:  # the model rejects the example
        shapes = ", ".join(f"{k}: {list(v.shape)} {DTYPES[v.dtype]}" for k, v in inputs.items())
        raise InvalidInput(
            f"the model failed on the example inputs ({shapes}): {_last_line(exc)}"
        ) from None


def _last_line(exc: BaseException) -> str:
    """The gist of an error: TorchScript errors carry a serialized-code traceback whose
    last line is the actual message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    if ": " not in text[:40]:
        text = f"{type(exc).__name__}: {text}"
    return text[:300]


def _flat(result: Any) -> list[torch.Tensor]:
    try:
        return flatten_outputs(result)
    except InvalidInput as exc:
        raise InvalidInput(f"unsupported model outputs: {exc.message}") from None


@dataclass(frozen=True)
class Probe:
    """What one probing of the model found: its signature, and inputs with the eager
    outputs they gave (at two batch sizes), against which every format is checked."""

    signature: Signature
    cases: tuple[tuple[dict[str, Array], list[Array]], ...]


def _output_names(result: Any, count: int, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        names = [str(n) for n in given]
        if len(names) != count:
            raise InvalidInput(f"{len(names)} output_names given for {count} model outputs")
    elif isinstance(result, dict):
        names = [str(k) for k in result]
    else:
        names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    if len(set(names)) != len(names):
        raise InvalidInput(f"output names must be unique, got {names}")
    return [validate_name(n, "output name") for n in names]


def _labels(
    task: str | None, labels: Sequence[str] | None, first: TensorSpec
) -> tuple[Task, tuple[str, ...] | None]:
    if task is not None and task not in TASKS:
        raise InvalidInput(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if labels is not None:
        if task not in (None, "classification"):
            raise InvalidInput(f"labels are only meaningful for classification, not {task!r}")
        task = "classification"
    resolved: Task = task if task is not None else "other"  # type: ignore[assignment]
    if resolved != "classification":
        return resolved, None
    classes = first.shape[-1] if len(first.shape) == 2 and first.shape[-1] > 0 else None
    if labels is None:
        return resolved, None if classes is None else tuple(str(i) for i in range(classes))
    names = tuple(str(label) for label in labels)
    if classes is None or len(names) != classes:
        raise InvalidInput(
            f"{len(names)} labels given, but output {first.name!r} has shape "
            f"{list(first.shape)}; classification needs one label per class"
        )
    if len(set(names)) != len(names):
        raise InvalidInput("class labels must be unique")
    return resolved, names


def probe(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    output_names: Sequence[str] | None = None,
    task: str | None = None,
    labels: Sequence[str] | None = None,
) -> Probe:
    """Run ``model`` on ``inputs`` and on a second batch size; infer the ``Signature``."""
    second = rebatch(inputs)
    first_result = _run(model, inputs)
    outputs = [_flat(first_result), _flat(_run(model, second))]
    names = _output_names(first_result, len(outputs[0]), output_names)
    batch = [int(next(iter(x.values())).shape[0]) for x in (inputs, second)]
    specs: list[TensorSpec] = []
    if len(outputs[1]) != len(outputs[0]):
        raise InvalidInput("the model returns a different number of outputs per batch size")
    for name, a, b in zip(names, outputs[0], outputs[1], strict=True):
        if a.dim() != b.dim() or a.dtype != b.dtype:
            raise InvalidInput(f"output {name!r} changes its rank or dtype with the batch size")
        if a.dim() == 0 or a.shape[0] != batch[0] or b.shape[0] != batch[1]:
            raise InvalidInput(
                f"output {name!r} has shape {list(a.shape)} for a batch of {batch[0]}: "
                "outputs need the batch as their first dimension"
            )
        if a.dtype not in DTYPES:
            raise InvalidInput(f"output {name!r}: {a.dtype} is not supported")
        shape = (-1, *(x if x == y else -1 for x, y in zip(a.shape[1:], b.shape[1:], strict=True)))
        specs.append(TensorSpec(name, DTYPES[a.dtype], tuple(int(d) for d in shape)))
    resolved_task, resolved_labels = _labels(task, labels, specs[0])
    signature = Signature(
        inputs=tuple(
            TensorSpec(k, DTYPES[v.dtype], (-1, *(int(d) for d in v.shape[1:])))
            for k, v in inputs.items()
        ),
        outputs=tuple(specs),
        task=resolved_task,
        labels=resolved_labels,
    )
    cases = tuple(
        ({k: v.numpy() for k, v in x.items()}, [t.detach().numpy().copy() for t in out])
        for x, out in zip((inputs, second), outputs, strict=True)
    )
    return Probe(signature, cases)
