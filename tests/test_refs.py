from __future__ import annotations

import pytest

from torchops.errors import InvalidName, InvalidRef, TorchopsError
from torchops.refs import ModelRef, validate_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits", ModelRef("digits")),
        ("digits:3", ModelRef("digits", version=3)),
        ("digits@staging", ModelRef("digits", alias="staging")),
        ("a.b-c_d", ModelRef("a.b-c_d")),
    ],
)
def test_parse_round_trip(text: str, expected: ModelRef) -> None:
    ref = ModelRef.parse(text)
    assert ref == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a:b:c",
        "a@b:1",
        "digits:",
        "digits:x",
        "digits:0",
        "digits:-1",
        "d@",
        "../x",
        "/etc",
        "a b",
    ],
)
def test_malformed_refs_raise_invalid_ref(text: str) -> None:
    with pytest.raises(InvalidRef) as info:
        ModelRef.parse(text)
    assert info.value.status == 400
    assert isinstance(info.value, TorchopsError)


@pytest.mark.parametrize("name", ["..", ".hidden", "-x", "a/b", "a\\b", "x" * 129, "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


def test_name_limits() -> None:
    assert validate_name("x" * 128) == "x" * 128
    with pytest.raises(InvalidRef):
        ModelRef("m", version=1, alias="prod")


def test_unicode_digits_are_not_versions() -> None:
    with pytest.raises(InvalidRef):
        ModelRef.parse("digits:\u0663")  # Arabic-Indic digit three
