"""The names the rest of torchops is written against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = [
    "FORMATS",
    "AliasEvent",
    "Array",
    "ArtifactInfo",
    "Format",
    "Inputs",
    "ModelInfo",
    "ModelVersion",
    "Outputs",
    "Signature",
    "Task",
    "TensorSpec",
]

Array: TypeAlias = npt.NDArray[Any]
Inputs: TypeAlias = "Array | Mapping[str, Array]"
Outputs: TypeAlias = "Array | dict[str, Array]"

Task = Literal["classification", "regression", "other"]
Format = Literal["torchscript", "exported", "onnx"]
#: serving formats in order of preference for ``Registry.load`` when none is named
FORMATS: tuple[Format, ...] = ("torchscript", "exported", "onnx")
#: non-serving artifact kinds a version may also hold
AUX_KINDS: tuple[str, ...] = ("weights", "example", "reference", "profile")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor: numpy dtype name (``float32``) and shape, ``-1`` for a variable dim."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)


@dataclass(frozen=True, slots=True)
class Signature:
    """Inputs and outputs of a model version and what it predicts."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: Task = "other"
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        labels = data.get("labels")
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            task=data.get("task", "other"),
            labels=tuple(str(x) for x in labels) if labels is not None else None,
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """One stored blob of a version: its kind (a format or ``weights``/``example``/...)."""

    kind: str
    sha256: str
    size: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha256": self.sha256, "size": self.size, **self.details}


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A registered, ready version. Immutable except for tags, description and aliases."""

    name: str
    version: int
    signature: Signature
    artifacts: dict[str, ArtifactInfo]
    created_at: datetime
    source: str = "upload"
    parent: int | None = None
    description: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> Task:
        return self.signature.task

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(f for f in FORMATS if f in self.artifacts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "source": self.source,
            "parent": self.parent,
            "description": self.description,
            "tags": dict(self.tags),
            "metrics": dict(self.metrics),
            "aliases": list(self.aliases),
            "task": self.task,
            "signature": self.signature.to_dict(),
            "artifacts": {k: a.to_dict() for k, a in self.artifacts.items()},
            "details": dict(self.details),
        }


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A registered model: its versions are listed by ``Registry.versions``."""

    name: str
    created_at: datetime
    description: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    latest_version: int | None = None
    version_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "description": self.description,
            "tags": dict(self.tags),
            "aliases": dict(self.aliases),
            "latest_version": self.latest_version,
            "version_count": self.version_count,
        }


@dataclass(frozen=True, slots=True)
class AliasEvent:
    """One move of an alias; ``from_version`` is None when created, ``to_version`` when removed."""

    name: str
    alias: str
    from_version: int | None
    to_version: int | None
    at: datetime
    actor: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alias": self.alias,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "reason": self.reason,
        }
