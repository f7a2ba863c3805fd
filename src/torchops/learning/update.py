"""One online update: train a copy of the champion and register it as a challenger.

``ChampionData`` is what updates need from the version they start from: its signature,
example inputs, reference sample, and a ``ReplayBuffer`` seeded with anchors — part of
the reference sample with the champion's outputs as soft targets; the rest of the
sample is kept to check retention. ``register_update`` trains the champion's TorchScript
archive on the buffer (``IncrementalTrainer``), packages the result like the champion
(formats, example, reference; the signature must not change) and registers it in one
atomic ``register_package``: ``source="online-learning"``, the champion as parent,
``gate=pending``, and in ``details["learner"]`` the feedback window, the buffer, the
training settings and numbers, and its evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from torchops.errors import InvalidInput, TrainingFailed
from torchops.learning._rows import predictions, softmax
from torchops.learning.gate import agreement
from torchops.learning.referee import Models
from torchops.learning.replay import ReplayBuffer
from torchops.learning.trainer import IncrementalTrainer, TrainConfig
from torchops.refs import ModelRef
from torchops.types import Array, ModelVersion, Signature, Task

if TYPE_CHECKING:
    from torchops.packaging import Package
    from torchops.registry import Registry
    from torchops.runtime import Runtime

__all__ = ["SOURCE", "ChampionData", "Update", "load_champion", "register_update"]

#: the ``source`` of every version the learner registers
SOURCE = "online-learning"


@dataclass
class ChampionData:
    """The champion's signature, example and reference, the buffer and loaded models."""

    signature: Signature
    example: dict[str, Array]
    reference: dict[str, Array] | None
    target_row: tuple[int, ...]  # the shape of one row of the first output
    buffer: ReplayBuffer
    models: Models

    @property
    def task(self) -> Task:
        return self.signature.task


@dataclass(frozen=True, slots=True)
class Update:
    """A registered challenger, its loaded runtime and the numbers of its training."""

    version: ModelVersion
    runtime: Runtime
    evaluation: dict[str, Any]
    message: str


def load_champion(
    registry: Registry,
    mv: ModelVersion,
    *,
    make_buffer: Callable[[Task, int | None], ReplayBuffer],
    retention_fraction: float,
    seed: int,
) -> ChampionData:
    """Load what updates from ``mv`` need; the buffer gets the reference's anchors."""
    signature = mv.signature
    if signature.task not in ("classification", "regression"):
        raise InvalidInput(
            f"online learning needs a classification or regression model; "
            f"{mv.name}:{mv.version} is {signature.task!r}"
        )
    ref = ModelRef(mv.name, version=mv.version)
    example = registry.example(ref)
    reference = registry.reference(ref)
    n_classes = len(signature.labels) if signature.labels else None
    if signature.task == "classification" and n_classes is None:
        n_classes = int(signature.outputs[0].shape[-1])
    buffer = make_buffer(signature.task, n_classes)
    anchors = retention = None
    if reference is not None:
        n = len(next(iter(reference.values())))
        order = np.random.default_rng(seed).permutation(n)
        n_check = int(n * retention_fraction)
        anchors = {k: v[order[n_check:]] for k, v in reference.items()}
        if n_check:
            retention = {k: v[order[:n_check]] for k, v in reference.items()}
    models = Models(registry, mv.name, signature.task, retention)
    runtime = models.runtime(mv.version)
    first = signature.outputs[0].name
    target_row = np.asarray(runtime.predict_batch(example)[first]).shape[1:]
    if anchors is not None and len(next(iter(anchors.values()))):
        outputs = np.asarray(runtime.predict_batch(anchors)[first])
        if signature.task == "classification" and not _probabilities(outputs):
            outputs = softmax(outputs)
        buffer.add_anchor(anchors, outputs)
    return ChampionData(signature, example, reference, tuple(target_row), buffer, models)


def register_update(
    registry: Registry,
    model: str,
    champion: int,
    data: ChampionData,
    *,
    config: TrainConfig,
    formats: Sequence[str],
    actor: str,
    train_threads: int | None,
    window: Mapping[str, Any],
    learner: Mapping[str, Any],
) -> Update:
    """Train a copy of ``model:champion`` on ``data.buffer`` and register it (pending).

    ``window``: the feedback ids and count of the labels new since the last update;
    ``learner``: what else to record under ``details["learner"]`` (alias, cutoff, gate,
    counters). Raises a TorchopsError (nothing registered) when training or packaging fails.
    """
    ref = ModelRef(model, version=champion)
    started = time.perf_counter()
    archive = registry.read_artifact(ref, "torchscript")
    with torch_threads(train_threads):
        result = IncrementalTrainer(config).train(archive, data.buffer)
    seconds = time.perf_counter() - started
    pkg = _package(result.torchscript, data, formats)
    from torchops.runtime import load_runtime

    runtime = load_runtime("torchscript", pkg.blobs["torchscript"], data.signature)
    retention = None
    on_reference = data.models.on_retention(champion)
    if on_reference is not None and data.models.retention is not None:
        mine = predictions(runtime, data.models.retention, data.task)
        retention = agreement(data.task, on_reference, mine)
    evaluation: dict[str, Any] = {
        "train_loss_first": result.losses[0],
        "train_loss_last": float(np.mean(result.losses[-10:])),
        "retention_agreement": retention,
    }
    buffer = data.buffer
    details = {
        "learner": {
            **learner,
            "window": dict(window),
            "buffer": {
                "recent": buffer.n_recent,
                "reservoir": buffer.n_reservoir,
                "anchors": buffer.n_anchors,
                "rejected": buffer.rejected,
            },
            "train": {
                **asdict(config),
                "kept_steps": result.steps,
                "discarded_steps": result.discarded_steps,
                "seconds": round(seconds, 3),
            },
            "evaluation": evaluation,
        }
    }
    metrics: dict[str, float] = {"train_loss": evaluation["train_loss_last"]}
    if retention is not None:
        metrics["retention_agreement"] = retention
    mv = registry.register_package(
        model,
        pkg,
        metrics=metrics,
        tags={"gate": "pending", "learner_alias": str(learner.get("alias"))},
        description=(
            f"online update of v{champion} on {window['labels']} new labels "
            f"(feedback ids {window['first_feedback_id']}..{window['last_feedback_id']})"
        ),
        parent=champion,
        source=SOURCE,
        actor=actor,
        details=details,
    )
    message = (
        f"registered v{mv.version} (from v{champion}, {window['labels']} new labels, "
        f"{result.steps} steps in {seconds:.2f} s)"
    )
    return Update(mv, runtime, evaluation, message)


def _package(torchscript: bytes, data: ChampionData, formats: Sequence[str]) -> Package:
    """The trained archive packaged like the champion (same signature, or TrainingFailed)."""
    from torchops.packaging import package
    from torchops.runtime.torchscript import load_torchscript

    sig = data.signature
    pkg = package(
        load_torchscript(torchscript),
        data.example,
        formats=formats,
        task=sig.task,
        labels=sig.labels,
        reference=data.reference,
        input_names=sig.input_names,
        output_names=sig.output_names,
    )
    if pkg.signature != sig:
        raise TrainingFailed(
            "the trained copy's signature differs from the champion's: "
            f"{pkg.signature.to_dict()} != {sig.to_dict()}"
        )
    return pkg


def _probabilities(outputs: Array) -> bool:
    """Whether a classifier's outputs already are class probabilities (else logits)."""
    return bool(
        outputs.ndim == 2
        and np.all(outputs >= 0)
        and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3)
    )


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the count.

    torch's setting applies to the calling thread and becomes the default of threads
    started later; the server's compute threads set their own count when they start.
    """
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
