"""HTTP answers: the ``Reply`` every route produces and the mapping of errors onto it.

``TorchopsError`` subclasses carry their status; anything else is a bug or a model that
raised, answered as a plain 500 whose body names the request id that the logged
traceback carries too. Nothing is classified by message text.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
from typing import Any

import orjson

from torchops.errors import Overloaded, TorchopsError, Unauthorized

__all__ = ["JSON", "OCTET_STREAM", "Reply", "RequestIds", "error_reply", "json_reply"]

log = logging.getLogger("torchops.serving")

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
Headers = tuple[tuple[bytes, bytes], ...]


class Reply:
    """A complete HTTP answer: status, body, content type and any extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self, status: int, body: bytes, content_type: bytes = JSON, headers: Headers = ()
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:80]!r})"


def json_reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY))


class RequestIds:
    """Cheap unique request ids: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return self.format(next(self._counter))

    def number(self) -> int:
        """The next id's number (``format`` makes it the id)."""
        return next(self._counter)

    def format(self, number: int) -> str:
        return f"{self.prefix}-{number}"


def error_reply(exc: BaseException, request_id: str | None = None, *, where: str = "") -> Reply:
    """The answer to ``exc``; unexpected exceptions are logged with their traceback."""
    if isinstance(exc, TorchopsError):
        status = exc.status
        headers: Headers = ()
        if isinstance(exc, Overloaded):
            headers = ((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()),)
        elif isinstance(exc, Unauthorized):
            headers = ((b"www-authenticate", b"Bearer"),)
        log.warning("%s %s (request %s): %s", where, status, request_id, exc.message)
        body: dict[str, Any] = {"error": exc.message}
        if request_id is not None and status >= 500:
            body["id"] = request_id
        return Reply(status, orjson.dumps(body), JSON, headers)
    log.error("%s internal error (request %s)", where, request_id, exc_info=exc)
    message = f"internal server error (request id {request_id})"
    return Reply(500, orjson.dumps({"error": message, "id": request_id}))
