"""The inference call, independent of the HTTP stack that carries it.

``InferenceService.infer`` takes the raw body and the few headers that matter and returns
a complete ``Reply``; it never raises. Both the ASGI app and the fast HTTP server call it,
so they answer byte for byte the same. The hot path does no per-request logging, no
pydantic and no thread hop: the batcher's compute thread is the only other thread
involved, and it hands results back once per batch.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import TYPE_CHECKING

import orjson

from torchops.errors import (
    DeadlineExceeded,
    InvalidInput,
    PayloadTooLarge,
    TorchopsError,
    Unavailable,
)
from torchops.serving.auth import TokenAuth
from torchops.serving.codec import InferRequest, decode_request, encode_response
from torchops.serving.errors import JSON, OCTET_STREAM, Reply, RequestIds, error_reply
from torchops.serving.manager import ModelManager
from torchops.serving.served import ServedVersion
from torchops.types import Array

if TYPE_CHECKING:
    from torchops.monitoring.monitor import Monitor

__all__ = ["InferenceService", "match_infer", "parse_version"]

access_log = logging.getLogger("torchops.access")

_IDENTITY = frozenset({b"", b"identity"})
_GZIP = frozenset({b"gzip", b"x-gzip"})
_MAX_REROUTES = 3


def match_infer(path: str) -> tuple[str, str | None] | None:
    """``(model, version)`` of an infer path ``/v2/models/{m}[/versions/{v}]/infer``, else None."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


def parse_version(text: str) -> int:
    """A model version from a URL: a positive integer, else ``InvalidInput``."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidInput(f"model version {text!r} is not a positive integer")
    return int(text)


class InferenceService:
    """Runs inference requests against the manager's versions and answers them.

    ``auth`` (a ``TokenAuth``) protects management calls, and inference too when
    ``auth_inference``. Without ``auth`` nothing is protected (for embedding in tests or
    behind a gateway that authenticates). ``reject_nonfinite`` refuses NaN and infinity
    in float inputs. ``monitor`` (a started ``Monitor``) observes every successful
    prediction, through the observer it gives each version's batcher (so the manager
    must not have loaded versions yet); None turns monitoring off.
    """

    def __init__(
        self,
        manager: ModelManager,
        *,
        auth: TokenAuth | None = None,
        auth_inference: bool = False,
        max_body_bytes: int = 64 * 1024 * 1024,
        request_timeout_s: float = 30.0,
        reject_nonfinite: bool = True,
        access_log: bool = False,
        monitor: Monitor | None = None,
    ) -> None:
        if auth_inference and auth is None:
            raise ValueError("auth_inference needs a token (auth)")
        self.manager = manager
        self.auth = auth
        self.auth_inference = auth_inference
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.reject_nonfinite = reject_nonfinite
        self.access_log = access_log
        self.monitor = monitor
        self.metrics = manager.metrics
        self.ids = RequestIds()
        if monitor is not None:
            # batches name requests by the number of a generated id; the writer adds this
            monitor.writer.id_prefix = self.ids.prefix
            manager.observers = monitor.observer
        #: set when shutdown starts: readiness turns 503 while in-flight requests finish
        self.shutting_down = False

    def check_token(self, authorization: bytes | str | None) -> None:
        """Raise ``Unauthorized`` unless the header carries the server token (if any)."""
        if self.auth is not None:
            self.auth.check(authorization)

    def decode_body(self, body: bytes, encoding: bytes) -> bytes:
        """Undo a ``Content-Encoding`` (gzip, deflate), bounded by ``max_body_bytes``."""
        codings = [c.strip().lower() for c in encoding.split(b",")]
        for coding in reversed(codings):
            if coding in _IDENTITY:
                continue
            if coding in _GZIP:
                body = self._inflate(body, zlib.MAX_WBITS | 16, "gzip")
            elif coding == b"deflate":
                body = self._inflate(body, zlib.MAX_WBITS, "deflate")
            else:
                name = coding.decode("latin-1")
                raise InvalidInput(
                    f"unsupported Content-Encoding {name!r}: send gzip, deflate or identity"
                )
        return body

    def _inflate(self, body: bytes, wbits: int, name: str) -> bytes:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error:
            if name != "deflate":
                raise InvalidInput(f"the body is not valid {name} data") from None
            return self._inflate_raw(body)
        if len(out) > self.max_body_bytes:
            raise PayloadTooLarge(
                f"the decompressed body exceeds the limit of {self.max_body_bytes} bytes"
            )
        if not inflater.eof:
            raise InvalidInput(f"the {name} body is truncated")
        return out

    def _inflate_raw(self, body: bytes) -> bytes:
        # some clients send raw DEFLATE without the zlib wrapper under "deflate"
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error:
            raise InvalidInput("the body is not valid deflate data") from None
        if len(out) > self.max_body_bytes:
            raise PayloadTooLarge(
                f"the decompressed body exceeds the limit of {self.max_body_bytes} bytes"
            )
        return out

    async def infer(
        self,
        model: str,
        version: str | None,
        body: bytes,
        header_length: bytes | None = None,
        content_encoding: bytes | None = None,
        authorization: bytes | None = None,
        request_id: bytes | None = None,
    ) -> Reply:
        """Answer one ``POST /v2/models/{model}[/versions/{version}]/infer``."""
        start = time.monotonic()
        served: ServedVersion | None = None
        rid: str | None = None
        try:
            if self.auth_inference:
                self.check_token(authorization)
            if content_encoding is not None:
                body = self.decode_body(body, content_encoding)
            length = None if header_length is None else _header_length(header_length)
            if version is None:
                served = self.manager.route(model)
            else:
                served = await self.manager.version(model, parse_version(version))
            request = decode_request(
                body, served.signature, header_length=length, reject_nonfinite=self.reject_nonfinite
            )
            rid = request.id
            key: int | str
            if rid is None and not request_id:
                key = self.ids.number()
                rid = self.ids.format(key)
            else:
                rid = key = rid if rid is not None else request_id.decode("latin-1")  # type: ignore[union-attr]
            served, outputs = await self._run(
                served, request, version is None, body, length, start, key
            )
            payload, json_length = encode_response(
                model_name=model,
                model_version=served.version_str,
                request_id=rid,
                outputs=outputs,
                request=request,
                signature=served.signature,
            )
        except Exception as exc:
            reply = error_reply(exc, rid or self.ids.next(), where=f"POST /v2/models/{model}")
            if served is not None:
                seconds = time.monotonic() - start
                self.metrics.observe_request(model, served.version_str, _outcome(exc), seconds)
            if self.access_log:
                self._log(rid, model, served, reply.status, start, len(body))
            return reply
        if json_length is None:
            reply = Reply(200, payload, JSON)
        else:
            header = ((b"inference-header-content-length", str(json_length).encode()),)
            reply = Reply(200, payload, OCTET_STREAM, header)
        seconds = time.monotonic() - start
        self.metrics.observe_request(model, served.version_str, "ok", seconds)
        if self.access_log:
            self._log(rid, model, served, 200, start, len(body))
        return reply

    async def _run(
        self,
        served: ServedVersion,
        request: InferRequest,
        follow_route: bool,
        body: bytes,
        header_length: int | None,
        start: float,
        key: int | str,
    ) -> tuple[ServedVersion, dict[str, Array]]:
        """Submit to the version's batcher (``key`` names the request to its observer); a
        request that raced a hot swap onto a version being retired is re-routed to the
        version that replaced it."""
        deadline = start + self.request_timeout_s
        for _ in range(_MAX_REROUTES):
            try:
                outputs = await served.batcher.submit(
                    request.inputs, deadline=deadline, request_id=key, started=start
                )
                return served, outputs
            except Unavailable:
                if not (follow_route and served.retired):
                    raise
            current = self.manager.route(served.name)
            if current.signature != served.signature:
                request = decode_request(
                    body,
                    current.signature,
                    header_length=header_length,
                    reject_nonfinite=self.reject_nonfinite,
                )
            served = current
        raise Unavailable(f"model {served.name!r} is switching versions; retry")

    def _log(
        self,
        rid: str | None,
        model: str,
        served: ServedVersion | None,
        status: int,
        start: float,
        size: int,
    ) -> None:
        record = {
            "id": rid,
            "model": model,
            "version": served.version if served is not None else None,
            "status": status,
            "seconds": round(time.monotonic() - start, 6),
            "bytes": size,
        }
        access_log.info(orjson.dumps(record).decode())


def _header_length(raw: bytes) -> int:
    text = raw.strip()
    if not text.isdigit():
        raise InvalidInput(
            f"Inference-Header-Content-Length {raw.decode('latin-1')!r} is not a number"
        )
    return int(text)


def _outcome(exc: Exception) -> str:
    if isinstance(exc, DeadlineExceeded):
        return "timeout"
    if isinstance(exc, Unavailable):
        return "unavailable"
    if isinstance(exc, TorchopsError) and exc.status < 500:
        return "invalid"
    return "error"
