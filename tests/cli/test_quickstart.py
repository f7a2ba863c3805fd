"""``torchops quickstart`` end to end, into a temporary home."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from typer.testing import Result

from torchops.packaging import load_checkpoint
from torchops.quickstart.data import load_digits_data
from torchops.quickstart.model import DigitsMLP
from torchops.registry import Registry
from torchops.types import FORMATS

Cli = Callable[..., Result]


def test_quickstart_trains_registers_and_promotes_digits(tmp_path: Path, cli: Cli) -> None:
    home = tmp_path / "home"
    first = cli("quickstart", "--home", home, "--epochs", "5", "--seed", "1")
    assert first.exit_code == 0, first.stderr
    for shown in ("digits:1", "production", "onnx", "exported", "tensorboard --logdir"):
        assert shown in first.stdout
    # the serve step answered every test image like the trained model, then the server stopped
    assert "Serve it over HTTP" in first.stdout and "350/350" in first.stdout
    (log,) = (home / "logs").glob("quickstart-serve-*.log")
    assert "shutting down" in log.read_text()
    assert str(home) in first.stdout
    # the served predictions' arrays went to segment files, and the summary says where
    assert list((home / "observations").glob("*.seg"))
    assert "observation arrays" in first.stdout

    with Registry(home) as registry:
        mv = registry.get("digits:1")
        # the learn step promoted a version trained online from the feedback
        production = registry.get("digits@production")
        assert production.version > 1 and production.source == "online-learning"
        assert production.parent is not None
        assert mv.task == "classification" and mv.source == "quickstart"
        assert mv.signature.labels == tuple(str(i) for i in range(10))
        assert mv.formats == FORMATS
        assert mv.metrics["accuracy"] > 0.9
        assert set(mv.metrics) == {"accuracy", "f1_macro", "loss"}
        reference = registry.reference("digits:1")
        assert reference is not None and reference["x"].shape == (500, 64)
        assert float(reference["x"].min()) >= 0.0 and float(reference["x"].max()) <= 1.0
        first_event, *moves = registry.history("digits", "production")
        assert first_event.to_version == 1 and first_event.reason == "quickstart"
        assert moves and moves[-1].to_version == production.version

        # the checkpoint resumes the very model that was registered
        checkpoint = Path(mv.tags["checkpoint"])
        assert checkpoint.is_file() and checkpoint.is_relative_to(home)
        model = DigitsMLP()
        optimizer = torch.optim.Adam(model.parameters())
        state = load_checkpoint(checkpoint, model, optimizer)
        assert state.step > 0 and state.extra["epochs"] == 5
        data = load_digits_data(seed=1)
        with torch.inference_mode():
            expected = model.eval()(torch.from_numpy(data.x_test)).numpy()
        for fmt in FORMATS:
            runtime = registry.load("digits:1", fmt)
            got = runtime.predict(data.x_test)
            assert isinstance(got, np.ndarray)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
            accuracy = float(np.mean(got.argmax(axis=1) == data.y_test))
            # one borderline image may flip between formats, no more
            assert abs(accuracy - mv.metrics["accuracy"]) <= 1 / len(data.y_test) + 1e-9
            runtime.close()

    events = list((home / "tensorboard" / "quickstart").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"loss/train", "accuracy/test"} <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("accuracy/test")] == [1, 2, 3, 4, 5]

    second = cli("quickstart", "--home", home, "--epochs", "5", "--seed", "1", "--no-serve")
    assert second.exit_code == 0, second.stderr
    assert f"moved from v{production.version}" in second.stdout
    assert "Serve it over HTTP" not in second.stdout
    assert len(list((home / "logs").glob("quickstart-serve-*.log"))) == 1
    with Registry(home) as registry:
        newest = registry.versions("digits")[-1]
        assert newest.source == "quickstart" and newest.version > production.version
        assert registry.get("digits@production").version == newest.version
        assert registry.history("digits", "production")[-1].to_version == newest.version
    assert len(list((home / "tensorboard" / "quickstart").rglob("events.out.tfevents.*"))) == 2
