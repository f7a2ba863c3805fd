"""register_package builds the monitoring profile from the reference sample."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from torchops.errors import InvalidInput, NotFound
from torchops.monitoring.profiles import Profile
from torchops.packaging import Package, decode_arrays
from torchops.registry import Registry

from .helpers import tiny_model, tiny_package


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "home") as registry:
        yield registry


def test_reference_sample_gives_a_profile_artifact(local: Registry) -> None:
    version = local.register_package("m", tiny_package(3, reference=True))
    assert "profile" in version.artifacts
    profile = Profile.from_bytes(local.read_artifact("m:1", "profile"))
    reference = decode_arrays(local.read_artifact("m:1", "reference"))["x"]
    assert profile.n_reference == len(reference) == 16
    assert [f.name for f in profile.features] == ["x[0]", "x[1]", "x[2]", "x[3]"]
    assert profile.features[2].mean == pytest.approx(float(reference[:, 2].mean()))
    # the prediction distribution comes from running the registered model on the sample
    with torch.no_grad():
        predicted = tiny_model(3)(torch.from_numpy(reference)).argmax(dim=1).numpy()
    assert profile.prediction == pytest.approx(np.bincount(predicted, minlength=3) / 16)


def test_register_builds_the_profile_too(local: Registry) -> None:
    reference = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    version = local.register(
        "eager", tiny_model(1), reference[:2], formats=["torchscript"], reference=reference
    )
    profile = Profile.from_bytes(local.read_artifact(f"eager:{version.version}", "profile"))
    assert profile.n_reference == 40 and profile.task == version.task


def test_no_reference_no_profile(local: Registry) -> None:
    version = local.register_package("m", tiny_package(0))
    assert "profile" not in version.artifacts
    with pytest.raises(NotFound, match="no 'profile' artifact"):
        local.read_artifact("m", "profile")


def test_a_given_profile_is_kept(local: Registry) -> None:
    pkg = tiny_package(0, reference=True)
    given = b'{"made": "elsewhere"}'
    blobs = {**pkg.blobs, "profile": given}
    local.register_package("m", Package(pkg.signature, blobs, pkg.reports, pkg.details))
    assert local.read_artifact("m", "profile") == given


def test_a_reference_the_model_cannot_take_registers_nothing(local: Registry) -> None:
    pkg = tiny_package(0)
    blobs = {**pkg.blobs, "reference": safetensors.numpy.save({"x": np.zeros((5, 7), np.float32)})}
    with pytest.raises(InvalidInput, match=r"reference sample.*'x'"):
        local.register_package("m", Package(pkg.signature, blobs, pkg.reports, pkg.details))
    assert local.models() == []
