"""The exception tree. Every error torchops raises on purpose is a ``TorchopsError``.

Each class carries the HTTP status the server answers with; the server maps them by
walking the class hierarchy, never by reading the message.
"""

from __future__ import annotations

__all__ = [
    "ArtifactCorrupted",
    "Conflict",
    "DeadlineExceeded",
    "ExportFailed",
    "Forbidden",
    "InvalidInput",
    "InvalidName",
    "InvalidRef",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "TorchopsError",
    "TrainingFailed",
    "Unauthorized",
    "Unavailable",
]


class TorchopsError(Exception):
    """Base of every error torchops raises on purpose."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TorchopsError):
    """The caller passed something malformed: a bad shape, dtype, file or value."""

    status = 400


class InvalidName(InvalidInput):
    """A model or alias name that does not match the allowed pattern."""


class InvalidRef(InvalidInput):
    """A model reference that cannot be parsed (``name``, ``name:3``, ``name@alias``)."""


class Unauthorized(TorchopsError):
    """Missing or wrong bearer token."""

    status = 401


class Forbidden(TorchopsError):
    status = 403


class NotFound(TorchopsError):
    """Unknown model, version, alias or artifact."""

    status = 404


class Conflict(TorchopsError):
    """The request contradicts the stored state (e.g. duplicate feedback)."""

    status = 409


class PayloadTooLarge(InvalidInput):
    status = 413


class ArtifactCorrupted(TorchopsError):
    """A stored blob whose bytes no longer match its sha256."""

    status = 500


class ExportFailed(TorchopsError):
    """A model could not be turned into a required format."""

    status = 400


class TrainingFailed(TorchopsError):
    """An online update produced no usable step (every loss, gradient or weight non-finite)."""

    status = 422


class Unavailable(TorchopsError):
    """The model exists but cannot answer now (not loaded, shutting down)."""

    status = 503


class Overloaded(Unavailable):
    """The request queue is full; the client should retry later."""

    retry_after: float = 1.0


class DeadlineExceeded(TorchopsError):
    """The request waited past its deadline before it could run."""

    status = 504
