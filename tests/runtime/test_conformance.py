"""The conformance suite every Runtime passes, for every format and several models."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_cases import Case

from torchops.errors import InvalidInput, Unavailable
from torchops.runtime import Runtime, load_runtime
from torchops.types import FORMATS, Array, Signature, TensorSpec

ATOL, RTOL = 1e-5, 1e-4


def _assert_close(name: str, got: Array, want: Array) -> None:
    assert got.shape == want.shape, name
    assert got.dtype == want.dtype, name
    if got.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    else:
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_batched_equals_unbatched(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(6, 1)
    batched = runtime.predict_batch(inputs)
    rows = [runtime.predict_batch({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(6)]
    for name, value in batched.items():
        _assert_close(name, np.concatenate([r[name] for r in rows]), value)


def test_parity_with_eager(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(7, 2)  # a batch size the exporters never saw
    outputs = runtime.predict_batch(inputs)
    expected = case.eager(inputs)
    assert list(outputs) == list(runtime.signature.output_names)
    for (name, got), want in zip(outputs.items(), expected, strict=True):
        _assert_close(name, got, want)


@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_match_signature(runtime: Runtime, case: Case, batch: int) -> None:
    outputs = runtime.predict_batch(case.sample(batch, 3))
    specs = runtime.signature.outputs
    assert tuple(outputs) == tuple(s.name for s in specs)
    for spec in specs:
        array = outputs[spec.name]
        assert array.dtype == np.dtype(spec.dtype)
        assert array.ndim == len(spec.shape)
        assert array.shape[0] == batch
        for want, got in zip(spec.shape[1:], array.shape[1:], strict=True):
            assert want in (-1, got)


def test_predict_takes_array_or_mapping(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(2, 4)
    named = runtime.predict_batch(inputs)
    result = runtime.predict(inputs)
    if len(named) == 1:
        assert isinstance(result, np.ndarray)
        np.testing.assert_array_equal(result, next(iter(named.values())))
    else:
        assert isinstance(result, dict)
        assert list(result) == list(named)
    if len(inputs) == 1:
        single = runtime.predict(next(iter(inputs.values())))
        assert isinstance(single, (np.ndarray, dict))
    else:
        with pytest.raises(InvalidInput, match="pass a dict"):
            runtime.predict(next(iter(inputs.values())))


def _first(signature: Signature) -> TensorSpec:
    return signature.inputs[0]


def test_wrong_shape_names_input_and_expected_shape(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(2, 5)
    spec = _first(runtime.signature)
    bad = inputs[spec.name]
    inputs[spec.name] = np.concatenate([bad, bad[..., :1]], axis=-1)  # one column too many
    with pytest.raises(InvalidInput) as err:
        runtime.predict_batch(inputs)
    message = str(err.value)
    assert repr(spec.name) in message
    assert f"{list(spec.shape)} {spec.dtype}" in message
    assert str(list(inputs[spec.name].shape)) in message


def test_wrong_rank_is_refused(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(2, 5)
    spec = _first(runtime.signature)
    inputs[spec.name] = inputs[spec.name][..., None]
    with pytest.raises(InvalidInput, match=repr(spec.name)):
        runtime.predict_batch(inputs)


def test_missing_input_is_named(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(2, 6)
    spec = _first(runtime.signature)
    del inputs[spec.name]
    with pytest.raises(InvalidInput) as err:
        runtime.predict_batch(inputs)
    assert f"missing input {spec.name!r}" in str(err.value)
    assert str(list(spec.shape)) in str(err.value)


def test_extra_input_is_named(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(2, 6)
    inputs["bogus"] = np.zeros((2, 1), dtype=np.float32)
    with pytest.raises(InvalidInput, match="unexpected input 'bogus'"):
        runtime.predict_batch(inputs)


@pytest.mark.parametrize("kind", ["str", "object", "complex"])
def test_non_numeric_input_is_refused(runtime: Runtime, case: Case, kind: str) -> None:
    inputs = case.sample(2, 7)
    spec = _first(runtime.signature)
    good = inputs[spec.name]
    if kind == "str":
        inputs[spec.name] = good.astype(str)
    elif kind == "object":
        inputs[spec.name] = good.astype(object)
    else:
        inputs[spec.name] = good.astype(np.complex64)
    with pytest.raises(InvalidInput) as err:
        runtime.predict_batch(inputs)
    assert repr(spec.name) in str(err.value)
    assert f"{list(spec.shape)} {spec.dtype}" in str(err.value)


def test_safe_casts_give_the_same_result(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(3, 8)
    expected = runtime.predict_batch(inputs)
    widened = {
        k: v.astype(np.float64) if v.dtype.kind == "f" else v.astype(np.int32)
        for k, v in inputs.items()
    }
    for name, value in runtime.predict_batch(widened).items():
        _assert_close(name, value, expected[name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_input_refuses_floats_and_mismatched_batches(
    two_inputs_case: Case, fmt: str
) -> None:
    pkg = two_inputs_case.package
    rt = load_runtime(fmt, pkg.blobs[fmt], pkg.signature)
    inputs = two_inputs_case.sample(2, 9)
    floats = dict(inputs, tokens=inputs["tokens"].astype(np.float32))
    with pytest.raises(InvalidInput, match=r"'tokens'.*\[-1, 3\] int64.*float32"):
        rt.predict_batch(floats)
    too_big = dict(inputs, tokens=inputs["tokens"].astype(np.uint64) + np.uint64(2**63))
    with pytest.raises(InvalidInput, match="do not fit int64"):
        rt.predict_batch(too_big)
    mismatched = dict(inputs, x=inputs["x"][:1])
    with pytest.raises(InvalidInput, match="different batch sizes"):
        rt.predict_batch(mismatched)


def test_read_only_and_strided_inputs(runtime: Runtime, case: Case) -> None:
    inputs = case.sample(4, 10)
    expected = runtime.predict_batch(inputs)
    odd: dict[str, Array] = {}
    for name, value in inputs.items():
        frozen = np.frombuffer(value.tobytes(), dtype=value.dtype).reshape(value.shape)
        assert not frozen.flags.writeable
        odd[name] = np.asfortranarray(frozen) if value.ndim == 2 else frozen
    for name, value in runtime.predict_batch(odd).items():
        _assert_close(name, value, expected[name])


def test_empty_batch_is_refused(runtime: Runtime, case: Case) -> None:
    inputs = {k: v[:0] for k, v in case.sample(2, 11).items()}
    with pytest.raises(InvalidInput, match="empty batch"):
        runtime.predict_batch(inputs)


def test_closed_runtime_is_unavailable(mlp_case: Case) -> None:
    for fmt in FORMATS:
        rt = load_runtime(fmt, mlp_case.package.blobs[fmt], mlp_case.package.signature)
        rt.close()
        with pytest.raises(Unavailable):
            rt.predict_batch(mlp_case.sample(1, 0))


def test_signature_that_disagrees_with_the_artifact_fails_at_load(mlp_case: Case) -> None:
    signature = mlp_case.package.signature
    wrong = Signature(
        inputs=signature.inputs,
        outputs=(TensorSpec("output", "int64", (-1, 5)),),
    )
    for fmt in FORMATS:
        with pytest.raises(InvalidInput, match="output"):
            load_runtime(fmt, mlp_case.package.blobs[fmt], wrong)


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _garbage(kind: str, marker: Path, other: bytes) -> bytes:
    if kind == "random":
        return np.random.default_rng(0).bytes(4096)
    if kind == "empty":
        return b""
    if kind == "pickle":
        return pickle.dumps(_Marker(marker))
    if kind == "torch_save":
        buffer = io.BytesIO()
        torch.save({"weight": torch.ones(2)}, buffer)
        return buffer.getvalue()
    if kind == "zip_with_pickle":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps(_Marker(marker)))
            archive.writestr("archive/version", "3")
        return buffer.getvalue()
    return other


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "kind", ["random", "empty", "pickle", "torch_save", "zip_with_pickle", "other_format"]
)
def test_garbage_bytes_raise_invalid_input_at_load(
    mlp_case: Case, fmt: str, kind: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    other = mlp_case.package.blobs["onnx" if fmt != "onnx" else "torchscript"]
    data = _garbage(kind, marker, other)
    with pytest.raises(InvalidInput):
        load_runtime(fmt, data, mlp_case.package.signature)
    assert not marker.exists()


def test_unknown_format_is_refused(mlp_case: Case) -> None:
    with pytest.raises(InvalidInput, match="unknown format"):
        load_runtime("tensorflow", b"", mlp_case.package.signature)
