from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from torchops.config import Settings
from torchops.errors import InvalidInput
from torchops.quickstart import STEPS, QuickstartConfig, QuickstartContext, Step, run_quickstart


def test_steps_run_in_order_and_share_the_context(tmp_path: Path) -> None:
    seen: list[tuple[float, Path | None]] = []

    def probe(ctx: QuickstartContext) -> None:
        _, model = ctx.trained()
        assert not model.training
        seen.append((ctx.metrics["accuracy"], ctx.tensorboard_dir))

    out = io.StringIO()
    train = next(step for step in STEPS if step.name == "train")
    ctx = run_quickstart(
        Settings(home=tmp_path),
        QuickstartConfig(epochs=2),
        console=Console(file=out, width=120),
        steps=[train, Step("probe", "Look at the trained model", probe)],
    )
    assert seen == [(ctx.metrics["accuracy"], ctx.tensorboard_dir)]
    assert ctx.metrics["accuracy"] > 0.8
    assert ctx.tensorboard_dir is not None and ctx.tensorboard_dir.is_relative_to(tmp_path)
    text = out.getvalue()
    assert text.index("1/2 Train") < text.index("2/2 Look at the trained model")


def test_the_default_steps() -> None:
    names = [s.name for s in STEPS]
    assert names[:5] == ["train", "checkpoint", "register", "promote", "serve"]
    assert names[-1] == "summary"
    # everything after the serve step that is not the summary talks to the server
    assert all(s.needs_server for s in STEPS[4:-1]) and not STEPS[-1].needs_server


def test_a_step_needing_an_earlier_one_says_so(tmp_path: Path) -> None:
    ctx = QuickstartContext(
        Settings(home=tmp_path), QuickstartConfig(), Console(file=io.StringIO()), "run"
    )
    with pytest.raises(RuntimeError, match="train step"):
        ctx.trained()
    with pytest.raises(RuntimeError, match="register step"):
        ctx.registered()


@pytest.mark.parametrize("field", ["epochs", "batch_size"])
def test_config_rejects_non_positive_sizes(field: str) -> None:
    with pytest.raises(InvalidInput, match=field.replace("_", " ")):
        QuickstartConfig(**{field: 0})
