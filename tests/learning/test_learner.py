"""The learner on a real registry and a real digits model, fed like the server feeds it.

``World.stream`` does what the server does for each prediction: it predicts with the
version the alias points to, records the observation (inputs, prediction) with the
``ObservationWriter`` and, when the label comes, the feedback with the ``FeedbackStore``.
The drift is the bench's: pixel intensities inverted (x -> 1 - x).
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from torchops.cli.main import app
from torchops.errors import Conflict, InvalidInput
from torchops.learning.gate import GateConfig
from torchops.learning.guard import GuardConfig
from torchops.learning.learner import SOURCE, Learner, start_embedded
from torchops.learning.trainer import TrainConfig
from torchops.monitoring.feedback import FeedbackStore
from torchops.monitoring.observations import Observation, ObservationWriter
from torchops.quickstart.data import DigitsData
from torchops.quickstart.model import DigitsMLP
from torchops.quickstart.train import fit_digits
from torchops.refs import ModelRef
from torchops.registry import Registry
from torchops.registry.store import utcnow
from torchops.runtime import Runtime
from torchops.types import Array, ModelVersion

NAME = "digits"
TRAIN = TrainConfig(optimizer="adam", lr=3e-3, steps=150, batch_size=64)


@cache
def digits() -> tuple[DigitsData, dict[str, torch.Tensor]]:
    """The quickstart's split and an MLP trained on its clean training images (once)."""
    data, model = fit_digits(epochs=20)
    return data, {k: v.clone() for k, v in model.state_dict().items()}


def drifted(x: Array) -> Array:
    return (1.0 - x).astype(np.float32)


def fresh_model() -> DigitsMLP:
    model = DigitsMLP()
    model.load_state_dict(digits()[1])
    return model.eval()


@dataclass
class World:
    """A registry with ``digits`` v1 in production, and a fake server in front of it."""

    registry: Registry
    writer: ObservationWriter
    feedback: FeedbackStore
    data: DigitsData
    runtimes: dict[int, Runtime] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=itertools.count)

    def production(self) -> int:
        return self.registry.aliases(NAME)[(NAME, "production")]

    def runtime(self, version: int) -> Runtime:
        if version not in self.runtimes:
            self.runtimes[version] = self.registry.load(f"{NAME}:{version}")
        return self.runtimes[version]

    def accuracy(self, version: int, x: Array, y: Array) -> float:
        out = self.runtime(version).predict_batch({"x": x})["output"]
        return float(np.mean(out.argmax(axis=1) == y))

    def serve(self, x: Array) -> list[str]:
        """Predict ``x`` with the production version and record one observation per row."""
        version = self.production()
        out = self.runtime(version).predict_batch({"x": x})["output"]
        ids = []
        for row in range(len(x)):
            rid = f"r{next(self.ids)}"
            self.writer.put(
                Observation(
                    request_id=rid,
                    model=NAME,
                    version=version,
                    at=utcnow(),
                    latency_s=0.001,
                    outputs={"output": out[row : row + 1]},
                    inputs={"x": x[row : row + 1]},
                    prediction=int(out[row].argmax()),
                    proba=None,
                )
            )
            ids.append(rid)
        self.writer.flush()
        return ids

    def label(self, ids: list[str], y: Array) -> None:
        result = self.feedback.add_many(NAME, list(zip(ids, [int(v) for v in y], strict=True)))
        assert result.accepted == len(ids), result.errors

    def stream(self, learner: Learner | None, x: Array, y: Array, *, batch: int = 25) -> None:
        """Serve and label ``x`` in batches, stepping ``learner`` after each."""
        for start in range(0, len(x), batch):
            self.label(self.serve(x[start : start + batch]), y[start : start + batch])
            if learner is not None:
                learner.step()


@contextmanager
def make_world(registry: Registry) -> Iterator[World]:
    data, _ = digits()
    registry.register(
        NAME,
        fresh_model(),
        data.x_test[:16],
        formats=("torchscript",),
        labels=data.labels,
        reference=data.x_train[:400],
    )
    registry.set_alias(NAME, "production", 1)
    writer = ObservationWriter(registry.engine, flush_interval_s=0.01)
    writer.start()
    try:
        yield World(registry, writer, FeedbackStore(registry.engine, writer), data)
    finally:
        writer.close()


@pytest.fixture
def world(registry: Registry) -> Iterator[World]:
    """On SQLite and PostgreSQL (the state a learner keeps lives in the database)."""
    with make_world(registry) as made:
        yield made


@pytest.fixture
def sqlite_world(tmp_path: Path) -> Iterator[World]:
    """On SQLite only: for the scenarios whose cost is training, not storage."""
    with Registry(tmp_path / "home") as registry, make_world(registry) as made:
        yield made


def learner(world: World, **options: Any) -> Learner:
    options.setdefault("train", TRAIN)
    return Learner(world.registry, NAME, **options)


def stream_data(world: World, n: int, *, seed: int = 0) -> tuple[Array, Array]:
    """``n`` training images in a random order (the model saw them clean, not inverted)."""
    order = np.random.default_rng(seed).permutation(len(world.data.x_train))[:n]
    return world.data.x_train[order], world.data.y_train[order]


def online_versions(world: World) -> list[ModelVersion]:
    return [v for v in world.registry.versions(NAME) if v.source == SOURCE]


# -- the drift scenario ------------------------------------------------------------------


def test_drift_registers_challengers_and_promotes_only_better_ones(sqlite_world: World) -> None:
    world = sqlite_world
    x, y = stream_data(world, 500)
    x_test, y_test = drifted(world.data.x_test), world.data.y_test
    before = world.accuracy(1, x_test, y_test)
    learn = learner(world)
    world.stream(learn, drifted(x), y)

    versions = online_versions(world)
    assert len(versions) >= 5
    first = versions[0]
    window = first.details["learner"]["window"]
    assert first.parent == 1
    assert window["labels"] == 50
    assert window["first_feedback_id"] < window["last_feedback_id"]
    assert first.details["learner"]["train"]["kept_steps"] == TRAIN.steps
    assert "retention_agreement" in first.details["learner"]["evaluation"]
    assert first.formats == ("torchscript",)
    assert all(v.tags["gate"] in {"pending", "promoted", "refused", "superseded"} for v in versions)

    production = world.production()
    assert production != 1, "the drift should have been learned"
    promoted = [v for v in versions if v.tags["gate"] == "promoted"]
    assert promoted
    moves = [e for e in world.registry.history(NAME, "production") if e.actor == SOURCE]
    assert [e.to_version for e in moves] == [v.version for v in promoted]
    for event in moves:  # each promotion: better on held-out drifted images than before
        assert event.reason is not None and "held-out labels" in event.reason
        assert "mcnemar p=" in event.reason
        assert event.from_version is not None and event.to_version is not None
        parent = world.accuracy(event.from_version, x_test, y_test)
        assert world.accuracy(event.to_version, x_test, y_test) > parent
        mv = world.registry.get(f"{NAME}:{event.to_version}")
        assert mv.metrics["gate_p_value"] < 0.05 / 3
        assert mv.metrics.get("gate_gain", math.inf) >= 0.01  # inf (not stored) from 0
        assert mv.metrics["gate_retention"] >= 0.95
    after = world.accuracy(production, x_test, y_test)
    assert after > before + 0.3, (before, after)
    status = learn.status()
    assert status["labels"] == 500 and status["rejected"] == 0
    learn.close()


def test_poisoned_feedback_never_ends_on_a_worse_version(sqlite_world: World) -> None:
    world = sqlite_world
    x, y = stream_data(world, 450, seed=1)
    poisoned = (9 - y) % 10  # every label flipped
    learn = learner(world)
    world.stream(learn, x, poisoned)
    clean_x, clean_y = world.data.x_test, world.data.y_test
    assert len(online_versions(world)) >= 5
    first = world.accuracy(1, clean_x, clean_y)
    assert world.accuracy(world.production(), clean_x, clean_y) >= first - 0.01
    learn.close()


def test_no_promotion_without_enough_held_out_labels(sqlite_world: World) -> None:
    world = sqlite_world
    x, y = stream_data(world, 140)
    learn = learner(world, gate=GateConfig(min_samples=200))
    world.stream(learn, drifted(x), y)
    assert len(online_versions(world)) == 2  # registered, but never judged
    assert all(v.tags["gate"] == "pending" for v in online_versions(world))
    assert world.production() == 1
    learn.close()


def test_rows_with_nan_inputs_are_rejected_and_counted(world: World) -> None:
    x, y = stream_data(world, 60)
    x = drifted(x)
    x[::3, 5] = np.nan
    learn = learner(world, update_every=30)
    world.stream(learn, x, y, batch=60)
    status = learn.status()
    assert status["rejected"] == 20
    assert status["labels"] == 40
    assert len(online_versions(world)) == 1  # 40 good labels, one update at 30
    learn.close()


# -- restarts and leases -----------------------------------------------------------------


def test_resume_after_restart_does_not_train_on_the_same_labels(world: World) -> None:
    x, y = stream_data(world, 120)
    x = drifted(x)
    world.stream(None, x[:70], y[:70])
    first = learner(world)
    first.step()
    assert len(online_versions(world)) == 1  # at label 50; 20 more counted
    assert first.status()["since_update"] == 20
    first.close()

    second = learner(world)
    second.step()  # nothing new: no update, nothing counted twice
    assert len(online_versions(world)) == 1
    assert second.status()["since_update"] == 20
    assert second.status()["labels"] == 70
    assert second.status()["pending"][0]["held_out"] == 20
    world.stream(second, x[70:100], y[70:100], batch=30)  # 20 + 30 → the next update
    versions = online_versions(world)
    assert len(versions) == 2
    window = versions[1].details["learner"]["window"]
    assert window["labels"] == 50
    assert window["first_feedback_id"] > versions[0].details["learner"]["cutoff"]
    second.close()


def test_a_second_learner_is_refused_while_the_first_holds_the_lease(world: World) -> None:
    first = learner(world)
    first.step()
    with pytest.raises(Conflict, match="already learning"):
        learner(world).step()
    first.close()
    learner(world).step()  # released: the next one may start


def test_crash_after_registering_resumes_from_the_registered_cutoff(world: World) -> None:
    x, y = stream_data(world, 60)
    world.stream(None, drifted(x), y)
    crashed = learner(world)
    crashed.step()
    # simulate a crash between registering and storing the place: drop the stored place
    from torchops.learning._state import learner_state

    with world.registry.engine.begin() as conn:
        conn.execute(learner_state.delete())
    resumed = learner(world)
    resumed.step()
    assert len(online_versions(world)) == 1
    status = resumed.status()
    assert status["cursor"] >= online_versions(world)[0].details["learner"]["cutoff"]
    assert [p["version"] for p in status["pending"]] == [online_versions(world)[0].version]
    resumed.close()


# -- the rollback guard and the rollback command -----------------------------------------


def register_bad_version(world: World) -> int:
    """A version that answers the class after the right one: promoted by hand."""
    torch.manual_seed(1)
    model = fresh_model()
    with torch.no_grad():
        last = model.layers[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight.copy_(torch.roll(last.weight, 1, dims=0))
        last.bias.copy_(torch.roll(last.bias, 1, dims=0))
    data = world.data
    mv = world.registry.register(
        NAME,
        model,
        data.x_test[:16],
        formats=("torchscript",),
        labels=data.labels,
        reference=data.x_train[:400],
        parent=1,
    )
    world.registry.set_alias(NAME, "production", mv.version, reason="manual release")
    return mv.version


def test_rollback_guard_moves_the_alias_back_on_a_significant_drop(world: World) -> None:
    bad = register_bad_version(world)
    learn = learner(world, guard=GuardConfig(min_samples=60, alpha=0.01), update_every=1000)
    x, y = stream_data(world, 80)
    world.stream(learn, x, y, batch=20)
    assert world.production() == 1
    last = world.registry.history(NAME, "production")[-1]
    assert (last.from_version, last.to_version, last.actor) == (bad, 1, SOURCE)
    assert last.reason is not None and last.reason.startswith("rollback guard:")
    assert "p=" in last.reason
    mv = world.registry.get(f"{NAME}:{bad}")
    assert mv.tags["rolled_back"] == "true"
    assert mv.tags["rollback_reason"] == last.reason
    assert mv.metrics["guard_drop"] > 0.5
    learn.close()


def test_rollback_guard_keeps_a_promotion_that_serves_well(world: World) -> None:
    data = world.data
    good = world.registry.register(
        NAME,
        fresh_model(),
        data.x_test[:16],
        formats=("torchscript",),
        labels=data.labels,
        parent=1,
    ).version
    world.registry.set_alias(NAME, "production", good)
    learn = learner(world, guard=GuardConfig(min_samples=60), update_every=1000)
    x, y = stream_data(world, 80)
    world.stream(learn, x, y, batch=20)
    assert world.production() == good
    assert world.registry.get(f"{NAME}:{good}").tags["guard"] == "kept"
    learn.close()


def test_rollback_command_moves_back_and_marks_the_version(world: World, tmp_path: Path) -> None:
    bad = register_bad_version(world)
    url = world.registry.settings.database_url
    home = str(world.registry.settings.home)
    runner = CliRunner()
    base = ["--home", home, "--registry-url", url]
    result = runner.invoke(app, [*base, "rollback", NAME, "--reason", "bad answers"])
    assert result.exit_code == 0, result.output
    assert f"v{bad} → v1" in result.output
    assert world.production() == 1
    last = world.registry.history(NAME, "production")[-1]
    assert last.reason == "bad answers"
    assert world.registry.get(f"{NAME}:{bad}").tags["rolled_back"] == "true"
    # nothing earlier to go back to now: v2 is marked rolled back, v1 has no predecessor
    again = runner.invoke(app, [*base, "rollback", NAME])
    assert again.exit_code == 1
    assert "no earlier version" in again.output
    explicit = runner.invoke(app, [*base, "rollback", NAME, "--to", "7"])
    assert explicit.exit_code == 1 and "7" in explicit.output
    assert world.production() == 1


# -- embedded and configuration ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_embedded_learner_learns_in_the_background(
    sqlite_world: World, mode: Literal["process", "thread"]
) -> None:
    world = sqlite_world
    x, y = stream_data(world, 60)
    world.stream(None, drifted(x), y)
    settings = world.registry.settings
    embedded = start_embedded(
        world.registry,
        settings,
        [NAME],
        mode=mode,
        interval_s=0.05,
        train=TRAIN,
    )
    try:
        for _ in range(3000):  # polls; starting and the update take a few seconds
            if online_versions(world) or not embedded.running:
                break
            time.sleep(0.02)
        assert len(online_versions(world)) == 1
        assert online_versions(world)[0].details["learner"]["train"]["steps"] == TRAIN.steps
        assert embedded.running
    finally:
        embedded.stop()
    assert not embedded.running
    # stopping stored the place and released the lease: another learner takes over at once
    takeover = learner(world)
    takeover.step()
    assert takeover.status()["labels"] == 60
    assert takeover.status()["since_update"] == 10
    takeover.close()


def test_bad_configuration_is_refused(world: World) -> None:
    with pytest.raises(InvalidInput, match="update_every"):
        Learner(world.registry, NAME, update_every=0)
    with pytest.raises(InvalidInput, match="format"):
        Learner(world.registry, NAME, formats=("pickle",))
    with pytest.raises(InvalidInput, match="not a version"):
        start_embedded(world.registry, world.registry.settings, [f"{NAME}:1"])
    other = world.registry.register(
        "other", torch.nn.Linear(4, 4), torch.zeros(2, 4), formats=("torchscript",)
    )
    world.registry.set_alias("other", "production", other.version)
    with pytest.raises(InvalidInput, match="classification or regression"):
        Learner(world.registry, "other").step()
    assert ModelRef.parse(NAME).name == NAME


# -- the command, shadow scoring, regression ----------------------------------------------


def test_learn_command_once_consumes_the_labels_and_reports(world: World) -> None:
    x, y = stream_data(world, 60)
    world.stream(None, drifted(x), y)
    url = world.registry.settings.database_url
    base = ["--home", str(world.registry.settings.home), "--registry-url", url]
    runner = CliRunner()
    args = [*base, "learn", NAME, "--once", "--steps", "20", "--update-every", "25"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "registered  v2" in result.output and "registered  v3" in result.output
    assert "60 accepted" in result.output
    versions = online_versions(world)
    assert [v.details["learner"]["train"]["steps"] for v in versions] == [20, 20]
    again = runner.invoke(app, [*base, "learn", NAME, "--once", "--json"])
    assert again.exit_code == 0, again.output
    data = json.loads(again.output)
    assert data["report"]["labels"] == 0  # nothing new: nothing counted twice
    assert data["status"]["labels"] == 60 and data["status"]["since_update"] == 10
    refused = runner.invoke(app, [*base, "learn", f"{NAME}:1", "--once"])
    assert refused.exit_code == 1 and "alias, not a version" in refused.output


def test_shadow_mode_scores_challengers_on_unlabelled_traffic(sqlite_world: World) -> None:
    world = sqlite_world
    x, y = stream_data(world, 90)
    learn = learner(world, shadow=True)
    world.stream(learn, drifted(x[:50]), y[:50])  # the update at 50 registers v2
    assert [v.version for v in online_versions(world)] == [2]
    world.serve(drifted(x[50:90]))  # 40 predictions nobody labels
    learn.step()
    metrics = world.registry.get(f"{NAME}:2").metrics
    assert metrics["shadow_rows"] == 40
    assert 0.0 <= metrics["shadow_agreement"] <= 1.0
    assert metrics["shadow_agreement"] < 0.9  # it learned the drift; v1 did not
    assert metrics["shadow_ms_per_row"] > 0
    learn.close()


def test_regression_model_learns_a_changed_relation(registry: Registry) -> None:
    rng = np.random.default_rng(0)
    weights = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    x_ref = rng.normal(size=(300, 4)).astype(np.float32)
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(weights[None]))
        net.bias.zero_()
    registry.register(
        "reg", net, x_ref[:8], formats=("torchscript",), task="regression", reference=x_ref
    )
    registry.set_alias("reg", "production", 1)
    writer = ObservationWriter(registry.engine, flush_interval_s=0.01)
    writer.start()
    feedback = FeedbackStore(registry.engine, writer)
    learn = Learner(
        registry,
        "reg",
        train=TrainConfig(lr=1e-2, steps=150, task="regression"),
        gate=GateConfig(min_samples=60, min_retention=None),
    )
    try:
        for batch in range(8):  # the relation changed: the last weight is now 0
            x = rng.normal(size=(30, 4)).astype(np.float32)
            target = x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)
            version = registry.aliases("reg")[("reg", "production")]
            runtime = registry.load(f"reg:{version}")
            name = runtime.signature.input_names[0]
            out = runtime.predict_batch({name: x})
            for row in range(30):
                writer.put(
                    Observation(
                        f"q{batch}-{row}", "reg", version, utcnow(), 0.001,
                        {"output": out["output"][row : row + 1]},
                        {name: x[row : row + 1]},
                        float(out["output"][row, 0]), None,
                    )
                )  # fmt: skip
            writer.flush()
            items = [(f"q{batch}-{row}", float(target[row])) for row in range(30)]
            assert feedback.add_many("reg", items).accepted == 30
            learn.step()
    finally:
        writer.close()
        learn.close()
    production = registry.aliases("reg")[("reg", "production")]
    assert production != 1
    mv = registry.get(f"reg:{production}")
    assert mv.source == SOURCE
    assert mv.metrics["gate_challenger"] < mv.metrics["gate_champion"]  # RMSE went down
    history = registry.history("reg", "production")[-1]
    assert history.reason is not None and "bootstrap" in history.reason


def test_learn_command_follows_until_interrupted(sqlite_world: World) -> None:
    world = sqlite_world
    x, y = stream_data(world, 50)
    world.stream(None, drifted(x), y)
    home = world.registry.settings.home
    torchops = str(Path(sys.executable).with_name("torchops"))
    command = [torchops, "--home", str(home), "learn", NAME, "--interval", "0.1", "--steps", "20"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(3000):
            if online_versions(world) or process.poll() is not None:
                break
            time.sleep(0.02)
        assert len(online_versions(world)) == 1
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert "registered  v2" in out.decode()
    takeover = learner(world)  # the interrupted learner released its lease
    takeover.step()
    assert takeover.status()["labels"] == 50
    takeover.close()


def test_learner_process_stops_when_the_server_dies(sqlite_world: World) -> None:
    home = sqlite_world.registry.settings.home
    script = (
        "import sys, time\n"
        "from torchops.config import Settings\n"
        "from torchops.learning.process import LearnerProcess\n"
        f"p = LearnerProcess(Settings.load(home={str(home)!r}), ['digits'], interval_s=0.1)\n"
        "p.start()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    assert _alive(child)
    parent.kill()  # no chance to stop its child
    parent.wait()
    parent.stdout.close()
    for _ in range(1500):
        if not _alive(child):
            break
        time.sleep(0.02)
    assert not _alive(child), "the learner process outlived its parent"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
