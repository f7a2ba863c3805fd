"""``Registry.register`` / ``export`` / ``load`` through the real packaging and runtimes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchops.errors import ArtifactCorrupted, InvalidInput, NotFound
from torchops.registry import Registry

from .helpers import EXAMPLE, snapshot, tiny_model


def _eager(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = tiny_model(7)(torch.from_numpy(x)).numpy()
    return out


def test_register_then_load_predicts_like_the_model(registry: Registry) -> None:
    version = registry.register(
        "tiny",
        tiny_model(7),
        torch.from_numpy(EXAMPLE),
        formats=("torchscript",),
        labels=["a", "b", "c"],
        reference={"x": np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)},
        metrics={"accuracy": 0.8},
        tags={"stage": "test"},
    )
    assert (version.version, version.formats, version.task) == (
        1,
        ("torchscript",),
        "classification",
    )
    assert version.signature.labels == ("a", "b", "c")
    assert version.details["torchscript_method"] in {"script", "trace"}
    assert version.metrics == {"accuracy": 0.8}
    np.testing.assert_array_equal(registry.example("tiny")["x"], EXAMPLE)
    reference = registry.reference("tiny")
    assert reference is not None and reference["x"].shape == (32, 4)
    runtime = registry.load("tiny")
    try:
        assert runtime.format == "torchscript"
        x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
        np.testing.assert_allclose(runtime.predict(x), _eager(x), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
    finally:
        runtime.close()


def test_every_format_registers_exports_and_loads(tmp_path: Path) -> None:
    with Registry(tmp_path / "home") as registry:
        version = registry.register("tiny", tiny_model(7), torch.from_numpy(EXAMPLE))
        assert version.formats == ("torchscript", "exported", "onnx")
        for fmt in version.formats:
            parity = version.artifacts[fmt].details
            assert parity["max_abs_diff"] is not None and parity["max_abs_diff"] < 1e-4
        x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
        for fmt in version.formats:
            runtime = registry.load("tiny:1", fmt)
            try:
                assert runtime.format == fmt
                np.testing.assert_allclose(runtime.predict(x), _eager(x), rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
            finally:
                runtime.close()


def test_export_derives_and_records_a_missing_format(registry: Registry) -> None:
    registry.register("tiny", tiny_model(7), torch.from_numpy(EXAMPLE), formats=("torchscript",))
    with pytest.raises(NotFound, match="'onnx'"):
        registry.load("tiny", "onnx")
    report = registry.export("tiny", "onnx", actor="ci")
    assert report.ok, report.error
    assert report.format == "onnx"
    version = registry.get("tiny:1")
    assert version.formats == ("torchscript", "onnx")
    assert version.artifacts["onnx"].details["exported_by"] == "ci"
    runtime = registry.load("tiny:1", "onnx")
    try:
        x = EXAMPLE[:1]
        np.testing.assert_allclose(runtime.predict(x), _eager(x), rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
    finally:
        runtime.close()
    again = registry.export("tiny:1", "onnx")
    assert again.ok and again.details["already_recorded"] is True
    assert again.details["sha256"] == version.artifacts["onnx"].sha256
    before = snapshot(registry)
    with pytest.raises(InvalidInput, match="unknown format"):
        registry.export("tiny", "tflite")
    with pytest.raises(InvalidInput, match="unknown format"):
        registry.load("tiny", "tflite")
    assert snapshot(registry) == before


def test_wrong_example_shape_registers_nothing(registry: Registry) -> None:
    registry.register("tiny", tiny_model(7), torch.from_numpy(EXAMPLE), formats=("torchscript",))
    before = snapshot(registry)
    with pytest.raises(InvalidInput):
        registry.register("tiny", tiny_model(7), torch.zeros(2, 5), formats=("torchscript",))
    with pytest.raises(InvalidInput):
        registry.register("bad name", tiny_model(7), torch.from_numpy(EXAMPLE))
    assert snapshot(registry) == before


def test_load_refuses_a_corrupted_artifact(tmp_path: Path) -> None:
    with Registry(tmp_path / "home") as registry:
        version = registry.register(
            "tiny", tiny_model(7), torch.from_numpy(EXAMPLE), formats=("torchscript",)
        )
        digest = version.artifacts["torchscript"].sha256
        path = Path(registry._blobs.path(digest))
        data = bytearray(path.read_bytes())
        data[-10] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactCorrupted, match=digest):
            registry.load("tiny")
