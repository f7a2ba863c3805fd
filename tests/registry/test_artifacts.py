from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from torchops.errors import ArtifactCorrupted, InvalidInput
from torchops.registry import ArtifactStore


@pytest.fixture(params=["path", "file-url", "memory-url"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "path":
        return ArtifactStore(str(tmp_path / "artifacts"))
    if request.param == "file-url":
        return ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    # the memory file system is process-global: give each test its own prefix
    return ArtifactStore(f"memory://torchops-test-{uuid.uuid4().hex}")


def test_put_returns_the_sha256_and_get_returns_the_bytes(blobs: ArtifactStore) -> None:
    data = b"hello torchops" * 100
    digest = blobs.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert blobs.exists(digest)
    assert blobs.get(digest) == data
    assert blobs.size(digest) == len(data)
    assert dict(blobs.blobs()) == {digest: len(data)}


def test_same_content_is_stored_once(blobs: ArtifactStore) -> None:
    first = blobs.put(b"abc")
    second = blobs.put(b"abc")
    other = blobs.put(b"abcd")
    assert first == second != other
    assert sorted(dict(blobs.blobs())) == sorted([first, other])


def test_a_flipped_byte_is_detected_and_named(blobs: ArtifactStore) -> None:
    data = bytes(range(256)) * 4
    digest = blobs.put(data)
    damaged = bytearray(data)
    damaged[100] ^= 0x01
    blobs._fs.pipe_file(blobs.path(digest), bytes(damaged))
    with pytest.raises(ArtifactCorrupted, match=digest) as info:
        blobs.get(digest, what="torchscript of digits:3")
    assert "digits:3" in info.value.message


def test_put_repairs_a_corrupted_blob(blobs: ArtifactStore) -> None:
    digest = blobs.put(b"payload")
    blobs._fs.pipe_file(blobs.path(digest), b"garbage")
    assert blobs.put(b"payload") == digest
    assert blobs.get(digest) == b"payload"


def test_a_missing_blob_is_reported(blobs: ArtifactStore) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not blobs.exists(digest)
    with pytest.raises(ArtifactCorrupted, match="missing"):
        blobs.get(digest, what="onnx of m:1")


def test_delete_frees_the_bytes(blobs: ArtifactStore) -> None:
    digest = blobs.put(b"x" * 1000)
    assert blobs.delete(digest) == 1000
    assert not blobs.exists(digest)
    assert blobs.delete(digest) == 0
    assert list(blobs.blobs()) == []


def test_writes_leave_no_temporary_files(blobs: ArtifactStore) -> None:
    for i in range(5):
        blobs.put(f"blob {i}".encode())
    assert blobs._fs.find(blobs._join("tmp")) == []


@pytest.mark.parametrize("bad", ["", "abc", "../" * 10, "G" * 64, "A" * 64])
def test_bad_digests_are_refused(blobs: ArtifactStore, bad: str) -> None:
    with pytest.raises(InvalidInput):
        blobs.get(bad)


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    blobs = ArtifactStore(str(tmp_path / "a"))
    stale = tmp_path / "a" / "tmp" / "dead-writer"
    stale.write_bytes(b"partial")
    old = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    os.utime(stale, (old, old))
    fresh = tmp_path / "a" / "tmp" / "live-writer"
    fresh.write_bytes(b"partial")
    assert blobs.remove_stale_temporaries(datetime.now(UTC) - timedelta(hours=1)) == 1
    assert not stale.exists()
    assert fresh.exists()


def test_local_blobs_live_under_the_folder(tmp_path: Path) -> None:
    blobs = ArtifactStore(str(tmp_path / "a"))
    digest = blobs.put(b"on disk")
    assert (tmp_path / "a" / "sha256" / digest[:2] / digest).read_bytes() == b"on disk"


def test_unknown_url_scheme_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="nosuchproto"):
        ArtifactStore("nosuchproto://bucket/prefix")
