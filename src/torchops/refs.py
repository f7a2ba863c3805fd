"""Model names and references: ``digits``, ``digits:3``, ``digits@staging``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torchops.errors import InvalidName, InvalidRef

__all__ = ["NAME_PATTERN", "ModelRef", "validate_name"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DEFAULT_ALIAS = "production"


def validate_name(name: str, what: str = "model name") -> str:
    """Return ``name`` if it is a valid model or alias name, else raise ``InvalidName``.

    >>> validate_name("digits")
    'digits'
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in {".", ".."}:
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class ModelRef:
    """How a user names a model version.

    ``version`` and ``alias`` are mutually exclusive; with neither, the reference means
    the ``production`` alias if it exists, else the latest version.

    >>> ModelRef.parse("digits:3")
    ModelRef(name='digits', version=3, alias=None)
    >>> str(ModelRef.parse("digits@staging"))
    'digits@staging'
    """

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.version is not None and self.alias is not None:
            raise InvalidRef("a model reference names a version or an alias, not both")
        if self.version is not None and (not isinstance(self.version, int) or self.version < 1):
            raise InvalidRef(f"invalid version {self.version!r}: versions are integers from 1")
        if self.alias is not None:
            validate_name(self.alias, "alias")

    @classmethod
    def parse(cls, text: str | ModelRef) -> ModelRef:
        """Parse ``name``, ``name:VERSION`` or ``name@ALIAS``."""
        if isinstance(text, ModelRef):
            return text
        if not isinstance(text, str) or not text:
            raise InvalidRef(f"invalid model reference {text!r}")
        if text.count(":") + text.count("@") > 1:
            raise InvalidRef(
                f"invalid model reference {text!r}: expected NAME, NAME:VERSION or NAME@ALIAS"
            )
        if ":" in text:
            name, _, version = text.partition(":")
            if not version.isdigit() or not version.isascii():
                raise InvalidRef(
                    f"invalid model reference {text!r}: the version after ':' must be a number"
                )
            return cls(_checked(name, text), version=int(version))
        if "@" in text:
            name, _, alias = text.partition("@")
            if not alias:
                raise InvalidRef(f"invalid model reference {text!r}: empty alias after '@'")
            return cls(_checked(name, text), alias=alias)
        return cls(_checked(text, text))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def _checked(name: str, text: str) -> str:
    try:
        return validate_name(name)
    except InvalidName as exc:
        raise InvalidRef(f"invalid model reference {text!r}: {exc.message}") from None
