"""Archives are checked before torch opens them: nothing from outside is unpickled."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from runtime_cases import Case

from torchops.errors import InvalidInput
from torchops.runtime import load_runtime
from torchops.runtime._archive import check_pt2_archive, check_torchscript_archive


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _rewrite(data: bytes, change: Callable[[str, bytes], bytes | None]) -> bytes:
    """Copy a zip, passing each member through ``change`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            content = change(name, src.read(name))
            if content is not None:
                dst.writestr(name, content)
    return out.getvalue()


def test_real_archives_pass(mlp_case: Case) -> None:
    check_torchscript_archive(mlp_case.package.blobs["torchscript"])
    check_pt2_archive(mlp_case.package.blobs["exported"])


def test_pt2_with_a_pickled_sample_input_is_refused_unpickled(
    mlp_case: Case, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Marker(marker))
    data = _rewrite(
        mlp_case.package.blobs["exported"],
        lambda name, content: evil if name.endswith("sample_inputs/model.pt") else content,
    )
    with pytest.raises(InvalidInput, match="weights_only"):
        load_runtime("exported", data, mlp_case.package.signature)
    assert not marker.exists()


def test_pt2_with_pickled_weights_is_refused(mlp_case: Case) -> None:
    def pickled(name: str, content: bytes) -> bytes:
        if not name.endswith("_weights_config.json"):
            return content
        config = json.loads(content)
        for entry in config["config"].values():
            entry["use_pickle"] = True
        return json.dumps(config).encode()

    data = _rewrite(mlp_case.package.blobs["exported"], pickled)
    with pytest.raises(InvalidInput, match="not a plain tensor"):
        load_runtime("exported", data, mlp_case.package.signature)


def test_pt2_with_unknown_entries_is_refused(mlp_case: Case) -> None:
    buffer = io.BytesIO(mlp_case.package.blobs["exported"])
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("archive/data/aotinductor/model.so", b"\x7fELF")
    with pytest.raises(InvalidInput, match="unexpected entry"):
        load_runtime("exported", buffer.getvalue(), mlp_case.package.signature)


def test_torchscript_without_code_is_refused(mlp_case: Case, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Marker(marker))
    data = _rewrite(
        mlp_case.package.blobs["torchscript"],
        lambda name, content: (
            None if "/code/" in name else evil if name.endswith("data.pkl") else content
        ),
    )
    with pytest.raises(InvalidInput, match="no TorchScript code"):
        load_runtime("torchscript", data, mlp_case.package.signature)
    assert not marker.exists()


def test_truncated_torchscript_is_invalid_input(mlp_case: Case) -> None:
    data = mlp_case.package.blobs["torchscript"]
    with pytest.raises(InvalidInput):
        load_runtime("torchscript", data[: len(data) // 2], mlp_case.package.signature)


def test_truncated_onnx_is_invalid_input(mlp_case: Case) -> None:
    data = mlp_case.package.blobs["onnx"]
    with pytest.raises(InvalidInput, match="not a loadable ONNX model"):
        load_runtime("onnx", data[: len(data) // 2], mlp_case.package.signature)
