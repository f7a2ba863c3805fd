"""Training checkpoints that are safe to load and resume training exactly.

A checkpoint is one zip file (written atomically) holding:

- ``model.safetensors``: the model's state dict;
- ``optimizer.pt``: the optimizer's state dict (``torch.save``), read back with
  ``torch.load(weights_only=True)`` so it can hold only tensors and plain values;
- ``rng.safetensors``: torch's CPU random number generator state, so dropout and
  shuffling continue where they left off;
- ``checkpoint.json``: the step and the caller's ``extra`` values.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from torchops.errors import InvalidInput
from torchops.packaging.weights import check_state_dict, decode_state_dict, encode_state_dict

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]

_META = "checkpoint.json"
_MODEL = "model.safetensors"
_OPTIMIZER = "optimizer.pt"
_RNG = "rng.safetensors"
_MEMBERS = frozenset({_META, _MODEL, _OPTIMIZER, _RNG})
_VERSION = 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What ``load_checkpoint`` read besides the weights: the step and the extra values."""

    step: int
    extra: dict[str, float | int | str] = field(default_factory=dict)


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, float | int | str]:
    clean: dict[str, float | int | str] = {}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, (float, int, str)):
            raise InvalidInput(f"checkpoint extra {key!r}: values must be numbers or strings")
        clean[key] = value
    return clean


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int = 0,
    extra: Mapping[str, float | int | str] | None = None,
) -> None:
    """Write ``model`` (and ``optimizer``, ``step``, ``extra``) to ``path`` atomically."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidInput(f"step must be a non-negative integer, got {step!r}")
    meta = {
        "torchops_checkpoint": _VERSION,
        "step": step,
        "extra": _check_extra(extra),
        "optimizer": optimizer is not None,
    }
    members = {
        _META: json.dumps(meta).encode(),
        _MODEL: encode_state_dict(model),
        _RNG: bytes(safetensors.torch.save({"cpu": torch.get_rng_state()})),
    }
    if optimizer is not None:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        members[_OPTIMIZER] = buffer.getvalue()
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    except OSError as exc:
        raise InvalidInput(f"cannot write checkpoint {str(target)!r}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> dict[str, bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read checkpoint {str(path)!r}: {exc.strerror}") from None
    not_ours = InvalidInput(f"{str(path)!r} is not a torchops checkpoint")
    if data[:4] != b"PK\x03\x04":
        raise not_ours
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if _META not in names or _MODEL not in names or not set(names) <= _MEMBERS:
                raise not_ours
            return {name: archive.read(name) for name in names}
    except (zipfile.BadZipFile, ValueError, OSError):
        raise not_ours from None


def _optimizer_state(data: bytes, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # anything torch refuses is refused
        raise InvalidInput(
            f"the checkpoint's optimizer state does not load safely: {type(exc).__name__}"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise InvalidInput("the checkpoint's optimizer state is not an optimizer state dict")
    saved = [len(g.get("params", ())) for g in state["param_groups"] if isinstance(g, dict)]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if saved != own:
        raise InvalidInput(
            f"the checkpoint's optimizer has parameter groups of sizes {saved}, "
            f"this optimizer {own}"
        )
    return state


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> Checkpoint:
    """Load a checkpoint into ``model`` (and ``optimizer``); restore torch's CPU RNG.

    Everything is checked before anything is changed: a file that is not a torchops
    checkpoint (e.g. a pickle), weights that do not fit, or optimizer state that is not
    plain tensors raise ``InvalidInput`` and leave ``model`` and ``optimizer`` as they were.
    """
    members = _read(Path(path))
    try:
        meta = json.loads(members[_META])
        step = int(meta["step"])
        extra = _check_extra(meta.get("extra"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInput(f"{str(path)!r} has an unreadable checkpoint.json") from None
    weights = decode_state_dict(members[_MODEL])
    check_state_dict(model, weights)
    state = None
    if optimizer is not None:
        if _OPTIMIZER not in members:
            raise InvalidInput(f"{str(path)!r} holds no optimizer state")
        state = _optimizer_state(members[_OPTIMIZER], optimizer)
    rng = decode_state_dict(members[_RNG]).get("cpu") if _RNG in members else None
    try:
        model.load_state_dict(weights, strict=True)
        if optimizer is not None and state is not None:
            optimizer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InvalidInput(f"the checkpoint does not fit: {exc}") from None
    if restore_rng and rng is not None:
        torch.set_rng_state(rng)
    return Checkpoint(step=step, extra=extra)
