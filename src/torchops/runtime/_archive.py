"""Structural checks of zip archives before torch opens them.

``torch.jit.load`` and ``torch.export.load`` parse pickles inside their archives, and the
``.pt2`` loader falls back to full ``pickle`` for some entries. Nothing from outside is
unpickled by torchops, so an archive must look exactly like what torch itself writes
for ordinary models before it is handed to torch.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

import torch

from torchops.errors import InvalidInput

__all__ = ["check_pt2_archive", "check_torchscript_archive", "is_zip"]

_PT2_FIXED = frozenset(
    {"archive_format", "archive_version", "byteorder", "version", ".data/version"}
)
_PT2_PATTERNS = (
    re.compile(r"\.data/serialization_id"),
    re.compile(r"models/[A-Za-z0-9_.-]+\.json"),
    re.compile(r"data/sample_inputs/[A-Za-z0-9_.-]+\.pt"),
    re.compile(r"data/weights/[A-Za-z0-9_.-]+_weights_config\.json"),
    re.compile(r"data/weights/weight_\d+"),
    re.compile(r"data/constants/[A-Za-z0-9_.-]+_constants_config\.json"),
    re.compile(r"data/constants/tensor_\d+"),
    re.compile(r"extra/[A-Za-z0-9_./-]+"),
)


def is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04" and zipfile.is_zipfile(io.BytesIO(data))


def _entries(data: bytes, what: str) -> tuple[zipfile.ZipFile, str, list[str]]:
    """Open ``data`` as a zip whose entries share one top folder; return (zip, prefix, rest)."""
    if not is_zip(data):
        raise InvalidInput(f"not a {what}: the data is not a zip archive")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InvalidInput(f"not a {what}: unreadable zip archive ({exc})") from None
    prefixes = {name.split("/", 1)[0] for name in names}
    if len(prefixes) != 1 or any("/" not in name for name in names):
        raise InvalidInput(f"not a {what}: unexpected archive layout")
    prefix = prefixes.pop() + "/"
    rest = [name[len(prefix) :] for name in names]
    if any(".." in part.split("/") for part in rest):
        raise InvalidInput(f"not a {what}: unexpected archive layout")
    return archive, prefix, rest


def check_torchscript_archive(data: bytes) -> None:
    """Raise ``InvalidInput`` unless ``data`` is laid out like a ``torch.jit.save`` archive."""
    what = "TorchScript archive"
    _, _, rest = _entries(data, what)
    present = set(rest)
    if not {"data.pkl", "constants.pkl"} <= present or not any(
        name.startswith("code/") for name in rest
    ):
        raise InvalidInput(
            f"not a {what}: it has no TorchScript code (a torch.save or pickle file is not "
            "accepted; save the model with torch.jit.script(model).save(path))"
        )


def _config(archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    try:
        payload = json.loads(archive.read(name))
        config = payload["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"not a torch.export archive: bad {name} ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"not a torch.export archive: bad {name}")
    return config


def check_pt2_archive(data: bytes) -> None:
    """Raise ``InvalidInput`` unless ``data`` is a ``torch.export.save`` archive of plain
    tensors: no pickled weights or constants, no custom objects, no compiled code."""
    what = "torch.export archive"
    archive, prefix, rest = _entries(data, what)
    for name in rest:
        if name not in _PT2_FIXED and not any(p.fullmatch(name) for p in _PT2_PATTERNS):
            raise InvalidInput(f"not a plain {what}: unexpected entry {name!r}")
    if "archive_format" not in rest or archive.read(prefix + "archive_format").strip() != b"pt2":
        raise InvalidInput(f"not a {what}: missing or wrong archive_format")
    if not any(name.startswith("models/") for name in rest):
        raise InvalidInput(f"not a {what}: it holds no model")
    for name in rest:
        if name.endswith("_config.json"):
            for key, entry in _config(archive, prefix + name).items():
                path = str(entry.get("path_name", "")) if isinstance(entry, dict) else ""
                if (
                    not isinstance(entry, dict)
                    or entry.get("use_pickle") is not False
                    or not (path.startswith(("weight_", "tensor_")))
                ):
                    raise InvalidInput(f"not a plain {what}: entry {key!r} is not a plain tensor")
        elif name.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.read(prefix + name)), weights_only=True)
            except Exception as exc:  # any failure means refuse
                raise InvalidInput(
                    f"not a plain {what}: {name!r} does not load with weights_only=True "
                    f"({type(exc).__name__})"
                ) from None
