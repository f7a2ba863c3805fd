"""Online learning: replay buffer, incremental updates, the gate and the rollback guard.

A ``ReplayBuffer`` mixes recent feedback, a reservoir of older feedback and anchors from
the registration's reference sample; an ``IncrementalTrainer`` trains a copy of the
champion's TorchScript archive on it; ``judge`` decides whether the challenger may be
promoted, ``check_rollback`` whether a promoted version must give way to its parent;
``Prequential`` scores the serving model on each label before it is trained on.
Importing this package does no work; names load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "Decision",
    "EmbeddedLearner",
    "GateConfig",
    "GuardConfig",
    "IncrementalTrainer",
    "Learner",
    "LearnerEvent",
    "LearnerProcess",
    "Prequential",
    "ReplayBuffer",
    "StepReport",
    "TrainConfig",
    "TrainResult",
    "Verdict",
    "check_rollback",
    "judge",
    "mcnemar_exact",
    "paired_bootstrap",
    "rollback",
    "start_embedded",
]

_LAZY = {
    "Decision": "torchops.learning.guard",
    "EmbeddedLearner": "torchops.learning.embedded",
    "GateConfig": "torchops.learning.gate",
    "GuardConfig": "torchops.learning.guard",
    "IncrementalTrainer": "torchops.learning.trainer",
    "Learner": "torchops.learning.learner",
    "LearnerEvent": "torchops.learning.referee",
    "LearnerProcess": "torchops.learning.process",
    "Prequential": "torchops.learning.prequential",
    "ReplayBuffer": "torchops.learning.replay",
    "StepReport": "torchops.learning.referee",
    "TrainConfig": "torchops.learning.trainer",
    "TrainResult": "torchops.learning.trainer",
    "Verdict": "torchops.learning.gate",
    "check_rollback": "torchops.learning.guard",
    "judge": "torchops.learning.gate",
    "mcnemar_exact": "torchops.learning.gate",
    "paired_bootstrap": "torchops.learning.gate",
    "rollback": "torchops.learning.referee",
    "start_embedded": "torchops.learning.embedded",
}

if TYPE_CHECKING:
    from torchops.learning.embedded import EmbeddedLearner, start_embedded
    from torchops.learning.gate import (
        GateConfig,
        Verdict,
        judge,
        mcnemar_exact,
        paired_bootstrap,
    )
    from torchops.learning.guard import Decision, GuardConfig, check_rollback
    from torchops.learning.learner import Learner
    from torchops.learning.prequential import Prequential
    from torchops.learning.process import LearnerProcess
    from torchops.learning.referee import LearnerEvent, StepReport, rollback
    from torchops.learning.replay import ReplayBuffer
    from torchops.learning.trainer import IncrementalTrainer, TrainConfig, TrainResult


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchops.learning' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
