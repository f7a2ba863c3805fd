from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from torchops.config import Settings
from torchops.errors import (
    ArtifactCorrupted,
    Conflict,
    InvalidInput,
    InvalidName,
    InvalidRef,
    NotFound,
)
from torchops.packaging import Package
from torchops.refs import ModelRef
from torchops.registry import GcReport, Registry

from .helpers import EXAMPLE, SIGNATURE, snapshot, tiny_package


def test_register_package_creates_consecutive_versions(registry: Registry) -> None:
    before = datetime.now(UTC)
    first = registry.register_package(
        "digits",
        tiny_package(0),
        metrics={"accuracy": 0.9},
        tags={"team": "vision"},
        description="first try",
        actor="alice",
    )
    second = registry.register_package("digits", tiny_package(1), parent=1, source="retrain")
    assert (first.name, first.version, second.version) == ("digits", 1, 2)
    assert first.signature == SIGNATURE
    assert first.task == "classification"
    assert first.formats == ("torchscript",)
    assert list(first.artifacts) == ["torchscript", "weights", "example"]
    assert first.artifacts["torchscript"].details["max_abs_diff"] == 0.0
    assert first.metrics == {"accuracy": 0.9}
    assert first.tags == {"team": "vision"}
    assert first.description == "first try"
    assert first.details["registered_by"] == "alice"
    assert first.details["torchscript_method"] == "script"
    assert first.details["reports"][0]["format"] == "torchscript"
    assert first.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= first.created_at <= datetime.now(UTC)
    assert (second.parent, second.source, first.parent, first.source) == (
        1,
        "retrain",
        None,
        "upload",
    )
    assert [v.version for v in registry.versions("digits")] == [1, 2]


def test_artifacts_round_trip_and_are_content_addressed(registry: Registry) -> None:
    pkg = tiny_package(3, reference=True)
    version = registry.register_package("m", pkg)
    for kind, data in pkg.blobs.items():
        assert registry.read_artifact("m:1", kind) == data
        info = version.artifacts[kind]
        assert info.size == len(data)
        assert registry._blobs.get(info.sha256) == data
    np.testing.assert_array_equal(registry.example("m")["x"], EXAMPLE)
    reference = registry.reference("m:1")
    assert reference is not None
    assert reference["x"].shape == (16, 4)
    with pytest.raises(NotFound, match="'onnx'"):
        registry.read_artifact("m:1", "onnx")


def test_reference_is_none_when_not_registered(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0))
    assert registry.reference("m") is None


def test_refs_resolve_to_production_else_latest(registry: Registry) -> None:
    for seed in range(3):
        registry.register_package("m", tiny_package(seed))
    assert registry.get("m").version == 3
    assert registry.get("m:2").version == 2
    registry.set_alias("m", "production", 1)
    registry.set_alias("m", "staging", 2)
    assert registry.get("m").version == 1
    assert registry.get("m@staging").version == 2
    assert registry.get(ModelRef("m", alias="production")).version == 1
    assert registry.get("m:1").aliases == ("production",)


@pytest.mark.parametrize(
    ("ref", "error", "words"),
    [
        ("nope", NotFound, "no model named 'nope'"),
        ("m:9", NotFound, "no version 9"),
        ("m@canary", NotFound, "no alias 'canary'"),
        ("m:x", InvalidRef, "must be a number"),
        ("../etc", InvalidRef, "invalid"),
        ("", InvalidRef, "invalid"),
    ],
)
def test_bad_refs_name_the_problem(
    registry: Registry, ref: str, error: type[Exception], words: str
) -> None:
    registry.register_package("m", tiny_package(0))
    with pytest.raises(error, match=words):
        registry.get(ref)


def test_models_lists_what_is_registered(registry: Registry) -> None:
    assert registry.models() == []
    registry.register_package("b", tiny_package(0))
    registry.register_package("a", tiny_package(0))
    registry.register_package("a", tiny_package(1))
    registry.set_alias("a", "production", 2)
    registry.set_model_description("a", "the A model")
    registry.set_model_tags("a", {"owner": "ml"})
    infos = registry.models()
    assert [m.name for m in infos] == ["a", "b"]
    a = registry.get_model("a")
    assert (a.latest_version, a.version_count, a.aliases) == (2, 2, {"production": 2})
    assert (a.description, a.tags) == ("the A model", {"owner": "ml"})
    assert a.created_at.tzinfo is not None
    assert infos[1].to_dict()["version_count"] == 1
    with pytest.raises(NotFound):
        registry.get_model("c")
    with pytest.raises(InvalidName):
        registry.get_model("a/b")


def test_aliases_move_and_history_records_every_move(registry: Registry) -> None:
    for seed in range(3):
        registry.register_package("m", tiny_package(seed))
    registry.register_package("other", tiny_package(0))
    registry.set_alias("m", "production", 1, actor="alice", reason="first release")
    registry.set_alias("m", "production", 1, actor="alice")  # no move, no event
    registry.set_alias("m", "production", 3, actor="bob", reason="better")
    registry.set_alias("m", "staging", 2)
    registry.set_alias("other", "production", 1)
    assert registry.aliases() == {
        ("m", "production"): 3,
        ("m", "staging"): 2,
        ("other", "production"): 1,
    }
    assert registry.aliases("other") == {("other", "production"): 1}
    registry.remove_alias("m", "staging", actor="carol", reason="done")
    events = registry.history("m")
    assert [(e.alias, e.from_version, e.to_version, e.actor, e.reason) for e in events] == [
        ("production", None, 1, "alice", "first release"),
        ("production", 1, 3, "bob", "better"),
        ("staging", None, 2, os_user(), None),
        ("staging", 2, None, "carol", "done"),
    ]
    assert [e.to_version for e in registry.history("m", "production")] == [1, 3]
    assert all(e.at.tzinfo is not None for e in events)
    assert events[0].to_dict()["from_version"] is None
    assert ("m", "staging") not in registry.aliases()


def os_user() -> str:
    import getpass

    return getpass.getuser()


def test_alias_at_answers_for_any_time(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0))
    registry.register_package("m", tiny_package(1))
    registry.set_alias("m", "production", 1)
    registry.set_alias("m", "production", 2)
    registry.remove_alias("m", "production")
    first, second, removed = (e.at for e in registry.history("m", "production"))
    assert registry.alias_at("m", "production", first - timedelta(microseconds=1)) is None
    assert registry.alias_at("m", "production", first) == 1
    assert registry.alias_at("m", "production", second) == 2
    assert registry.alias_at("m", "production", removed) is None
    assert registry.alias_at("m", "staging", datetime.now(UTC)) is None
    with pytest.raises(InvalidInput, match="timezone"):
        registry.alias_at("m", "production", datetime(2030, 1, 1))
    with pytest.raises(NotFound):
        registry.alias_at("x", "production", datetime.now(UTC))


def test_alias_errors_change_nothing(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0))
    before = snapshot(registry)
    with pytest.raises(NotFound, match="no version 7"):
        registry.set_alias("m", "production", 7)
    with pytest.raises(InvalidName):
        registry.set_alias("m", "prod/../x", 1)
    with pytest.raises(InvalidInput):
        registry.set_alias("m", "production", 0)
    with pytest.raises(NotFound):
        registry.set_alias("nope", "production", 1)
    with pytest.raises(NotFound, match="no alias 'staging'"):
        registry.remove_alias("m", "staging")
    assert snapshot(registry) == before
    assert registry.history("m") == []


def test_tags_metrics_and_descriptions_merge(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0), tags={"a": "1", "b": "2"}, metrics={"f1": 0.5})
    registry.set_version_tags("m:1", {"b": None, "c": "3"})
    registry.set_metrics("m:1", {"f1": 0.75, "loss": 1, "gone": None})
    registry.set_version_description("m:1", "tuned")
    registry.set_model_tags("m", {"x": "y"})
    registry.set_model_tags("m", {"x": None, "z": "w"})
    registry.set_model_description("m", "a model")
    version = registry.get("m:1")
    assert version.tags == {"a": "1", "c": "3"}
    assert version.metrics == {"f1": 0.75, "loss": 1.0}
    assert version.description == "tuned"
    model = registry.get_model("m")
    assert (model.tags, model.description) == ({"z": "w"}, "a model")
    registry.set_version_description("m:1", None)
    assert registry.get("m:1").description is None


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.set_metrics("m:1", {"acc": float("nan")}),
        lambda r: r.set_metrics("m:1", {"acc": "high"}),
        lambda r: r.set_metrics("m:1", {"acc": True}),
        lambda r: r.set_version_tags("m:1", {"k": 3}),
        lambda r: r.set_version_tags("m:1", {"": "v"}),
        lambda r: r.set_model_tags("m", ["not", "a", "mapping"]),
        lambda r: r.set_model_description("m", 42),
        lambda r: r.set_metrics("m:5", {"acc": 1.0}),
    ],
)
def test_bad_metadata_changes_nothing(registry: Registry, change: object) -> None:
    registry.register_package("m", tiny_package(0), metrics={"acc": 0.5}, tags={"k": "v"})
    before = snapshot(registry)
    with pytest.raises((InvalidInput, NotFound)):
        change(registry)  # type: ignore[operator]
    assert snapshot(registry) == before


def _without(pkg: Package, kind: str) -> Package:
    return Package(
        signature=pkg.signature,
        blobs={k: v for k, v in pkg.blobs.items() if k != kind},
        reports=pkg.reports,
        details=pkg.details,
    )


def _with_blob(pkg: Package, kind: str, data: object) -> Package:
    return Package(
        signature=pkg.signature,
        blobs={**pkg.blobs, kind: data},  # type: ignore[dict-item]
        reports=pkg.reports,
        details=pkg.details,
    )


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r, p: r.register_package("bad/name", p), InvalidName),
        (lambda r, p: r.register_package("..", p), InvalidName),
        (lambda r, p: r.register_package("m", _without(p, "torchscript")), InvalidInput),
        (lambda r, p: r.register_package("m", _with_blob(p, "pickle", b"x")), InvalidInput),
        (lambda r, p: r.register_package("m", _with_blob(p, "onnx", b"")), InvalidInput),
        (lambda r, p: r.register_package("m", _with_blob(p, "onnx", "text")), InvalidInput),
        (lambda r, p: r.register_package("m", p, metrics={"acc": float("inf")}), InvalidInput),
        (lambda r, p: r.register_package("m", p, tags={"k": 1}), InvalidInput),
        (lambda r, p: r.register_package("m", p, parent=9), NotFound),
        (lambda r, p: r.register_package("new", p, parent=1), NotFound),
        (lambda r, p: r.register_package("m", p, parent=0), InvalidInput),
        (lambda r, p: r.register_package("m", p, source=""), InvalidInput),
        (lambda r, p: r.register_package("m", p, details={"x": object()}), InvalidInput),
        (lambda r, p: r.register_package("m", p, actor=""), InvalidInput),
    ],
)
def test_bad_registrations_change_nothing(registry: Registry, call: object, error: type) -> None:
    registry.register_package("m", tiny_package(0))
    before = snapshot(registry)
    with pytest.raises(error):
        call(registry, tiny_package(5))  # type: ignore[operator]
    assert snapshot(registry) == before
    assert [v.version for v in registry.versions("m")] == [1]


def test_a_flipped_byte_is_caught_on_read(registry: Registry) -> None:
    version = registry.register_package("m", tiny_package(0))
    digest = version.artifacts["torchscript"].sha256
    path = Path(registry._blobs.path(digest))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted) as info:
        registry.read_artifact("m:1", "torchscript")
    assert digest in info.value.message
    assert "m:1" in info.value.message
    # other artifacts of the version are intact
    assert registry.read_artifact("m:1", "weights") == tiny_package(0).blobs["weights"]


def test_deleting_versions_frees_only_unshared_blobs(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0))
    registry.register_package("m", tiny_package(0))  # same bytes: shares every blob
    registry.register_package("m", tiny_package(1))
    shared = set(a.sha256 for a in registry.get("m:1").artifacts.values())
    own = set(a.sha256 for a in registry.get("m:3").artifacts.values()) - shared
    assert own
    stored = lambda: {d for d, _ in registry._blobs.blobs()}  # noqa: E731
    assert shared | own <= stored()
    registry.delete("m:1")
    assert shared <= stored()
    assert [v.version for v in registry.versions("m")] == [2, 3]
    registry.delete("m:3")
    assert not own & stored()
    registry.delete("m:2")
    assert stored() == set()
    assert registry.versions("m") == []
    with pytest.raises(NotFound, match="no versions"):
        registry.get("m")
    # numbers are never reused
    assert registry.register_package("m", tiny_package(0)).version == 4


def test_delete_refuses_aliased_versions_unless_forced(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0))
    registry.register_package("m", tiny_package(1))
    registry.set_alias("m", "production", 2)
    before = snapshot(registry)
    with pytest.raises(Conflict, match="production"):
        registry.delete("m:2")
    with pytest.raises(Conflict, match="production"):
        registry.delete("m@production")
    with pytest.raises(Conflict):
        registry.delete("m")
    assert snapshot(registry) == before
    registry.delete("m:2", force=True, actor="ops")
    assert registry.aliases("m") == {}
    last = registry.history("m")[-1]
    assert (last.from_version, last.to_version, last.actor) == (2, None, "ops")
    assert "deleted" in (last.reason or "")
    with pytest.raises(NotFound):
        registry.delete("m:2")


def test_deleting_a_model_removes_everything_it_alone_used(registry: Registry) -> None:
    registry.register_package("keep", tiny_package(0))
    registry.register_package("drop", tiny_package(0))
    registry.register_package("drop", tiny_package(1))
    registry.set_alias("drop", "production", 1)
    registry.delete("drop", force=True)
    assert [m.name for m in registry.models()] == ["keep"]
    counts, blobs = snapshot(registry)
    assert counts["versions"] == 1 and counts["aliases"] == 0 and counts["alias_events"] == 0
    assert set(blobs) == {a.sha256 for a in registry.get("keep").artifacts.values()}
    assert registry.read_artifact("keep", "torchscript") == tiny_package(0).blobs["torchscript"]
    with pytest.raises(NotFound):
        registry.delete("drop")


def test_gc_removes_unreferenced_blobs_only(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0))
    orphan = registry._blobs.put(b"left behind by a crashed registration")
    assert registry.gc() == GcReport(removed=1, freed_bytes=37)
    assert not registry._blobs.exists(orphan)
    assert registry.gc() == GcReport(removed=0, freed_bytes=0)
    assert registry.read_artifact("m", "torchscript") == tiny_package(0).blobs["torchscript"]
    assert registry.gc().to_dict() == {"removed": 0, "freed_bytes": 0}


def test_gc_keeps_blobs_of_registrations_in_flight(registry: Registry) -> None:
    data = b"being written right now"
    with registry._lease([_sha(data)]) as lease:
        registry._blobs.put(data)
        assert registry.gc().removed == 0
        assert registry._blobs.exists(_sha(data))
        assert lease.committed is False
    # the writer gave up: its blob went with it
    assert not registry._blobs.exists(_sha(data))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_default_home_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCHOPS_REGISTRY_URL", raising=False)
    monkeypatch.delenv("TORCHOPS_ARTIFACT_URL", raising=False)
    with Registry() as registry:
        registry.register_package("m", tiny_package(0))
        assert registry.settings.home == tmp_path / "home"
    assert (tmp_path / "home" / "registry.db").exists()
    assert len(list((tmp_path / "home" / "artifacts" / "sha256").rglob("*"))) > 3
    with Registry(tmp_path / "home") as again:
        assert again.get("m").version == 1


def test_settings_and_fsspec_artifacts(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "ignored", artifact_url="memory://reg-test-settings")
    with Registry(tmp_path / "home", settings=settings) as registry:
        assert registry.settings.home == tmp_path / "home"
        assert registry.home == tmp_path / "home"
        registry.register_package("m", tiny_package(0))
        assert registry.read_artifact("m", "weights") == tiny_package(0).blobs["weights"]
        assert "memory://" in repr(registry)
    assert (tmp_path / "home" / "registry.db").exists()
    assert not (tmp_path / "home" / "artifacts").exists()


def test_history_timestamps_are_ordered(registry: Registry) -> None:
    registry.register_package("m", tiny_package(0))
    registry.register_package("m", tiny_package(1))
    for version in (1, 2, 1, 2):
        registry.set_alias("m", "production", version)
        time.sleep(0.001)
    stamps = [e.at for e in registry.history("m")]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 4
    assert all(s.utcoffset() == timedelta(0) for s in stamps)
