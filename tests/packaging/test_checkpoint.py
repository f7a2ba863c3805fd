"""Checkpoints: exact resume, and nothing unsafe or ill-fitting is loaded."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from torchops import load_checkpoint, save_checkpoint
from torchops.errors import InvalidInput


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    model.train()
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _fresh(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _model()
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def test_resume_continues_training_exactly(tmp_path: Path) -> None:
    total, split = 12, 5
    straight, opt = _fresh(0)
    _train(straight, opt, range(total))

    first, opt1 = _fresh(0)
    _train(first, opt1, range(split))
    path = tmp_path / "ckpt.torchops"
    save_checkpoint(path, first, opt1, step=split, extra={"loss": 0.5, "note": "mid"})

    torch.manual_seed(999)  # scramble the RNG: the checkpoint must restore it
    resumed, opt2 = _fresh(7)
    info = load_checkpoint(path, resumed, opt2)
    assert info.step == split
    assert info.extra == {"loss": 0.5, "note": "mid"}
    _train(resumed, opt2, range(split, total))

    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_weights_only_checkpoint_loads_without_optimizer(tmp_path: Path) -> None:
    model, _ = _fresh(3)
    save_checkpoint(tmp_path / "c", model)
    other, opt = _fresh(4)
    assert load_checkpoint(tmp_path / "c", other).step == 0
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(InvalidInput, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "c", other, opt)


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_a_pickle_is_not_a_checkpoint(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    if how == "pickle":
        path.write_bytes(pickle.dumps(_Marker(marker)))
    else:
        torch.save({"model": _Marker(marker)}, path)
    model, opt = _fresh(0)
    before = _snapshot(model)
    with pytest.raises(InvalidInput, match="not a torchops checkpoint"):
        load_checkpoint(path, model, opt)
    assert not marker.exists()
    assert _unchanged(model, before)


def test_malicious_optimizer_state_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    model, opt = _fresh(0)
    _train(model, opt, range(2))
    good = tmp_path / "good"
    save_checkpoint(good, model, opt, step=2)
    evil = io.BytesIO()
    torch.save({"state": {0: _Marker(marker)}, "param_groups": []}, evil)
    bad = tmp_path / "bad"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, evil.getvalue() if name == "optimizer.pt" else src.read(name))
    target, target_opt = _fresh(5)
    before = _snapshot(target)
    with pytest.raises(InvalidInput, match="does not load safely"):
        load_checkpoint(bad, target, target_opt)
    assert not marker.exists()
    assert _unchanged(target, before)
    assert target_opt.state_dict()["state"] == {}


def test_checkpoint_of_another_model_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    model, opt = _fresh(0)
    save_checkpoint(tmp_path / "c", model, opt)
    other = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(8, 3)
    )
    before = _snapshot(other)
    with pytest.raises(InvalidInput, match=r"'0.weight' is \[16, 6\], the model expects \[8, 6\]"):
        load_checkpoint(tmp_path / "c", other)
    assert _unchanged(other, before)
    renamed = torch.nn.Sequential(torch.nn.Linear(6, 3))
    with pytest.raises(InvalidInput, match=r"unexpected 3\.bias, 3\.weight"):
        load_checkpoint(tmp_path / "c", renamed)


def test_bad_arguments(tmp_path: Path) -> None:
    model, _ = _fresh(0)
    with pytest.raises(InvalidInput, match="step"):
        save_checkpoint(tmp_path / "c", model, step=-1)
    with pytest.raises(InvalidInput, match="numbers or strings"):
        save_checkpoint(tmp_path / "c", model, extra={"bad": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(InvalidInput, match="cannot write"):
        save_checkpoint(tmp_path / "missing" / "c", model)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_checkpoint(tmp_path / "nothing", model)
    assert list(tmp_path.iterdir()) == []
