"""What the FastAPI routes share: a ``Reply`` as a Starlette response, and error mapping."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from torchops.serving.errors import Reply, RequestIds, error_reply

__all__ = ["guarded", "to_response"]


def to_response(reply: Reply) -> Response:
    """``reply`` as the response Starlette sends."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reply.headers}
    return Response(
        reply.body, reply.status, headers, media_type=reply.content_type.decode("latin-1")
    )


async def guarded(
    ids: RequestIds, request: Request, work: Callable[[], Awaitable[Reply]]
) -> Response:
    """The reply of ``work``, or the error it raised as ``{"error": ...}``."""
    try:
        return to_response(await work())
    except Exception as exc:
        rid = request.headers.get("x-request-id") or ids.next()
        return to_response(error_reply(exc, rid, where=f"{request.method} {request.url.path}"))
