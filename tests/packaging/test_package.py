"""package / package_torchscript / export_format on real models and real exporters."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from torchops.errors import ExportFailed, InvalidInput
from torchops.packaging import (
    Package,
    decode_arrays,
    export_format,
    package,
    package_torchscript,
)
from torchops.runtime import load_runtime
from torchops.types import FORMATS


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 24),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),  # active in train mode: parity needs eval mode
        torch.nn.Linear(24, 4),
    )


class GeneratorSum(torch.nn.Module):
    """torch.jit.script cannot compile the generator expression; trace can."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 3) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(head(x) for head in self.heads)  # type: ignore[return-value]


class BakedBatch(GeneratorSum):
    """Not scriptable, and the trace bakes the example's batch size into the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = int(x.shape[0])
        return super().forward(x).reshape(rows, 3) + torch.zeros(rows, 3)


class SingularValues(torch.nn.Module):
    """torch.export handles SVD; the ONNX exporter has no translation for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x.reshape(x.shape[0], 2, 2))


class Branchy(torch.nn.Module):
    """Data-dependent control flow: scriptable, but torch.export refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x * 3


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def mlp() -> tuple[torch.nn.Module, torch.Tensor, Package]:
    model = _mlp()
    model.train()
    example = torch.randn(5, 16)
    reference = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    pkg = package(model, example, labels=["a", "b", "c", "d"], reference=reference)
    return model, example, pkg


def test_every_format_is_recorded_with_parity(
    mlp: tuple[torch.nn.Module, torch.Tensor, Package],
) -> None:
    _, _, pkg = mlp
    assert set(pkg.blobs) == {*FORMATS, "weights", "example", "reference"}
    assert pkg.formats == FORMATS
    assert [r.format for r in pkg.reports] == list(FORMATS)
    for report in pkg.reports:
        assert report.ok, report.error
        assert report.error is None
        assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
        assert report.max_rel_diff is not None
        assert report.seconds > 0
        assert report.to_dict()["format"] == report.format
    assert pkg.details["torchscript_method"] == "script"


def test_signature_task_and_labels(mlp: tuple[torch.nn.Module, torch.Tensor, Package]) -> None:
    sig = mlp[2].signature
    assert sig.to_dict() == {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 16]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 4]}],
        "task": "classification",
        "labels": ["a", "b", "c", "d"],
    }


def test_training_flag_is_restored(mlp: tuple[torch.nn.Module, torch.Tensor, Package]) -> None:
    assert mlp[0].training


def test_example_reference_and_weights_blobs(
    mlp: tuple[torch.nn.Module, torch.Tensor, Package],
) -> None:
    model, example, pkg = mlp
    stored = decode_arrays(pkg.blobs["example"])
    np.testing.assert_array_equal(stored["input"], example.numpy())
    assert decode_arrays(pkg.blobs["reference"])["input"].shape == (20, 16)
    fresh = _mlp()
    torch.nn.init.zeros_(fresh[0].weight)
    fresh.load_state_dict(safetensors.torch.load(pkg.blobs["weights"]))
    fresh.eval()
    model.eval()
    try:
        torch.testing.assert_close(fresh(example), model(example))
    finally:
        model.train()


def test_recorded_formats_agree_with_eager_on_new_data(
    mlp: tuple[torch.nn.Module, torch.Tensor, Package],
) -> None:
    model, _, pkg = mlp
    x = np.random.default_rng(5).standard_normal((9, 16)).astype(np.float32)
    model.eval()
    try:
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
    finally:
        model.train()
    for fmt in FORMATS:
        got = load_runtime(fmt, pkg.blobs[fmt], pkg.signature).predict(x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_script_falls_back_to_trace() -> None:
    torch.manual_seed(1)
    model = GeneratorSum()
    pkg = package(model, torch.randn(4, 6), formats=["torchscript"])
    assert pkg.details["torchscript_method"] == "trace"
    report = pkg.report("torchscript")
    assert report is not None and report.ok
    assert report.details["method"] == "trace"
    assert "script" in report.details["script_error"]
    x = torch.randn(7, 6)
    got = load_runtime("torchscript", pkg.blobs["torchscript"], pkg.signature).predict(x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_no_torchscript_at_all_is_export_failed() -> None:
    with pytest.raises(ExportFailed, match=r"script: .*; trace: "):
        package(BakedBatch(), torch.randn(4, 6), formats=["torchscript"])


def test_failing_onnx_is_reported_and_the_rest_recorded() -> None:
    pkg = package(SingularValues(), torch.randn(3, 4))
    onnx = pkg.report("onnx")
    assert onnx is not None and not onnx.ok
    assert onnx.error and "svd" in onnx.error
    assert "onnx" not in pkg.blobs
    assert pkg.formats == ("torchscript", "exported")
    assert all(r.ok for r in pkg.reports if r.format != "onnx")


def test_failing_torch_export_is_reported_and_torchscript_recorded() -> None:
    pkg = package(Branchy(), torch.randn(3, 4))
    exported = pkg.report("exported")
    assert exported is not None and not exported.ok and exported.error
    assert "exported" not in pkg.blobs
    assert "torchscript" in pkg.blobs


def test_formats_subset_and_unknown_format() -> None:
    pkg = package(torch.nn.Linear(3, 2), torch.randn(2, 3), formats=("torchscript",))
    assert pkg.formats == ("torchscript",)
    assert [r.format for r in pkg.reports] == ["torchscript"]
    with pytest.raises(InvalidInput, match="unknown format 'tflite'"):
        package(torch.nn.Linear(3, 2), torch.randn(2, 3), formats=["tflite"])


def test_wrong_example_and_wrong_reference_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"\[2, 5\] float32"):
        package(torch.nn.Linear(3, 2), torch.randn(2, 5))
    with pytest.raises(InvalidInput, match=r"reference sample: input 'input'.*\[-1, 3\]"):
        package(torch.nn.Linear(3, 2), torch.randn(2, 3), reference=np.zeros((4, 5)))


def test_onnx_export_is_quiet_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    pkg = package(torch.nn.Linear(3, 2), torch.randn(2, 3), formats=["onnx"])
    pkg_failing = package(Branchy(), torch.randn(2, 3), formats=["exported", "onnx"])
    assert "onnx" in pkg.blobs
    assert "exported" not in pkg_failing.blobs
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def scripted_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    model = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh()))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model.save(str(path))
    return path


def test_package_torchscript_file(scripted_file: Path) -> None:
    pkg = package_torchscript(scripted_file, np.ones((2, 5), dtype=np.float32), task="regression")
    assert pkg.details["torchscript_method"] == "given"
    assert pkg.formats == FORMATS, [r.error for r in pkg.reports]
    assert pkg.signature.task == "regression"
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    outs = [load_runtime(f, pkg.blobs[f], pkg.signature).predict(x) for f in FORMATS]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["pickle", "torch_save", "random", "missing"])
def test_package_torchscript_refuses_other_files(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(_Marker(marker)))
    elif kind == "torch_save":
        torch.save(torch.nn.Linear(5, 3), path)
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(InvalidInput):
        package_torchscript(path, np.ones((2, 5), dtype=np.float32))
    assert not marker.exists()


def test_export_format_derives_from_stored_torchscript(
    mlp: tuple[torch.nn.Module, torch.Tensor, Package],
) -> None:
    _, _, pkg = mlp
    example = decode_arrays(pkg.blobs["example"])
    reference = load_runtime("torchscript", pkg.blobs["torchscript"], pkg.signature)
    for fmt in FORMATS:
        data, report = export_format(pkg.blobs["torchscript"], pkg.signature, example, fmt)
        assert report.ok, report.error
        assert data is not None
        derived = load_runtime(fmt, data, pkg.signature)
        x = {"input": np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)}
        np.testing.assert_allclose(derived.predict(x), reference.predict(x), rtol=1e-4, atol=1e-5)


def test_export_format_reports_failure_without_raising() -> None:
    pkg = package(SingularValues(), torch.randn(3, 4), formats=["torchscript"])
    example = decode_arrays(pkg.blobs["example"])
    data, report = export_format(pkg.blobs["torchscript"], pkg.signature, example, "onnx")
    assert data is None
    assert not report.ok and report.error


def test_export_format_refuses_bad_arguments(
    mlp: tuple[torch.nn.Module, torch.Tensor, Package],
) -> None:
    _, _, pkg = mlp
    example = decode_arrays(pkg.blobs["example"])
    with pytest.raises(InvalidInput, match="not a TorchScript archive"):
        export_format(b"garbage", pkg.signature, example, "onnx")
    with pytest.raises(InvalidInput, match=r"input 'input'.*\[-1, 16\]"):
        export_format(pkg.blobs["torchscript"], pkg.signature, {"input": np.zeros((2, 3))}, "onnx")
    with pytest.raises(InvalidInput, match="unknown format"):
        export_format(pkg.blobs["torchscript"], pkg.signature, example, "coreml")


def test_package_of_a_script_module_keeps_it_in_train_mode() -> None:
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.9)))
    module.train()
    pkg = package(module, torch.randn(4, 3), formats=["torchscript"])
    assert pkg.report("torchscript") is not None
    assert module.training
    buffer = io.BytesIO(pkg.blobs["torchscript"])
    assert torch.jit.load(buffer).training is False
