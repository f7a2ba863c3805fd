"""A small HTTP/1.1 server on asyncio + httptools, built for the infer route.

Measured on this project's 2-core box (one core for the server, an OIP JSON body like the
``mlp`` benchmark's, 64 connections), a do-nothing-but-decode-and-encode app answers
~19k req/s under uvicorn (httptools + uvloop), ~17k under granian (ASGI) and ~19k under
granian's RSGI, but ~38k when the request is answered straight from an
``asyncio.Protocol``: the ASGI layer itself (scope dicts, receive/send coroutines, the
framework's routing) costs as much as the JSON work. So ``POST …/infer`` is answered
here directly through ``InferenceService.infer``; every other request is handed to the
ASGI app (FastAPI) through a minimal bridge, so management calls and the OpenAPI docs
keep all of FastAPI.

Keep-alive, pipelining (answered in order), ``Expect: 100-continue``, a body size limit
(413 before the body is read when Content-Length says so) and graceful shutdown are
handled; chunked request bodies are accepted; responses carry Content-Length.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import socket
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any, cast
from urllib.parse import unquote

import httptools
import orjson

from torchops.errors import InvalidInput, PayloadTooLarge, TorchopsError
from torchops.serving.app import TorchopsApp
from torchops.serving.errors import error_reply
from torchops.serving.service import match_infer

__all__ = ["HttpServer"]

log = logging.getLogger("torchops.serving")
access_log = logging.getLogger("torchops.access")

_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_DROPPED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"date"})
_MAX_PIPELINED = 16
_MAX_HEAD_BYTES = 64 * 1024
_LINGER_S = 2.0

# a parsed request: method, url, headers, body, keep-alive
_Request = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]


def _status_line(status: int) -> bytes:
    line = _STATUS.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Unknown\r\n".encode()


class HttpServer:
    """Serves a ``TorchopsApp`` over HTTP/1.1 on a listening socket."""

    def __init__(
        self, app: TorchopsApp, *, access_log: bool = False, keepalive_timeout_s: float = 75.0
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.keepalive_timeout_s = keepalive_timeout_s
        self.service = app.service
        self.max_body_bytes = app.max_body_bytes
        self.connections: set[HttpProtocol] = set()
        self.date_header = b""
        self.shutting_down = False
        self._server: asyncio.AbstractServer | None = None
        self._timers: list[asyncio.TimerHandle] = []

    async def start(self, sock: socket.socket) -> None:
        """Start accepting connections on ``sock`` (already bound and listening or not)."""
        loop = asyncio.get_running_loop()
        self._tick_date()
        self._sweep()
        self._server = await loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=2048)

    def _tick_date(self) -> None:
        self.date_header = b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"
        self._schedule(1.0, self._tick_date)

    def _sweep(self) -> None:
        """Close connections that stayed idle for a whole keep-alive period."""
        for conn in list(self.connections):
            if not conn.active and not conn.busy:
                conn.close()
            conn.active = False
        self._schedule(self.keepalive_timeout_s, self._sweep)

    def _schedule(self, delay: float, callback: Any) -> None:
        loop = asyncio.get_running_loop()
        self._timers = [t for t in self._timers if not t.cancelled() and t.when() > loop.time()]
        self._timers.append(loop.call_later(delay, callback))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish the requests in flight (up to ``timeout``), then close."""
        self.shutting_down = True
        self.service.shutting_down = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        deadline = time.monotonic() + timeout
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        for timer in self._timers:
            timer.cancel()
        if self._server is not None:
            await self._server.wait_closed()


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests with httptools and answers them in order."""

    __slots__ = (
        "active",
        "body",
        "body_size",
        "busy",
        "closed",
        "discarding",
        "disconnected",
        "headers",
        "loop",
        "parser",
        "pending",
        "reading_paused",
        "server",
        "transport",
        "url",
        "writing_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.busy = False
        self.active = True
        self.closed = False
        self.discarding = False
        self.reading_paused = False
        self.writing_paused = False
        self.pending: deque[_Request] = deque()
        self.disconnected: asyncio.Event | None = None

    # -- transport callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.pending.clear()
        # the parser calls back into this protocol and the transport holds it: letting go
        # of both (and of the last request's body) frees a closed connection at once, by
        # reference counting, instead of at the cyclic GC's next collection, which would
        # keep every closed connection's last body until then
        del self.parser
        self.transport = None
        self.body = []
        self.headers = []
        if self.disconnected is not None:
            self.disconnected.set()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.active = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(InvalidInput("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            self._refuse(InvalidInput(f"malformed HTTP request: {exc}"))

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if len(self.pending) < _MAX_PIPELINED:
            self._resume_reading()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.discarding:
            return
        self.url = b""
        self.headers = []
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > _MAX_HEAD_BYTES:
            self._refuse(InvalidInput(f"the request URL is longer than {_MAX_HEAD_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        # body_size counts header bytes until the body starts
        self.body_size += len(name) + len(value)
        if self.body_size > _MAX_HEAD_BYTES:
            self._refuse(InvalidInput(f"request headers exceed {_MAX_HEAD_BYTES} bytes"))

    def on_headers_complete(self) -> None:
        self.body_size = 0
        if self.discarding:
            return
        limit = self.server.max_body_bytes
        for name, value in self.headers:
            if name == b"content-length" and value.strip().isdigit() and int(value) > limit:
                self._refuse(
                    PayloadTooLarge(
                        f"request body of {int(value)} bytes exceeds the limit of {limit} bytes"
                    )
                )
                return
            if name == b"expect" and value.lower() == b"100-continue" and self.transport:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.discarding:
            return
        self.body_size += len(body)
        if self.body_size > self.server.max_body_bytes:
            limit = self.server.max_body_bytes
            self._refuse(PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"))
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.discarding:
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        request = (
            self.parser.get_method(),
            self.url,
            self.headers,
            body,
            self.parser.should_keep_alive(),
        )
        if self.busy:
            self.pending.append(request)
            if len(self.pending) >= _MAX_PIPELINED:
                self._pause_reading()
        else:
            self._start(request)

    # -- answering ------------------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        self.busy = True
        method, url, _, _, _ = request
        if method == b"POST":
            path = url.partition(b"?")[0].decode("latin-1")
            target = match_infer(path if "%" not in path else unquote(path))
            if target is not None:
                self.loop.create_task(self._infer(request, target[0], target[1]))
                return
        self.loop.create_task(self._asgi(request))

    async def _infer(self, request: _Request, model: str, version: str | None) -> None:
        _, _, headers, body, keep_alive = request
        length = encoding = auth = rid = None
        for name, value in headers:
            if name == b"inference-header-content-length":
                length = value
            elif name == b"content-encoding":
                encoding = value
            elif name == b"authorization":
                auth = value
            elif name == b"x-request-id":
                rid = value
        try:
            reply = await self.server.service.infer(
                model, version, body, length, encoding, auth, rid
            )
        except Exception as exc:  # infer answers every error itself: this would be a bug
            reply = error_reply(exc, self.server.service.ids.next(), where="POST infer")
        self._reply(reply.status, reply.content_type, reply.headers, reply.body, keep_alive)

    def _write_head(
        self, status: int, headers: list[bytes], length: int, keep_alive: bool
    ) -> bytes:
        head = [_status_line(status), self.server.date_header]
        head.extend(headers)
        head.append(b"content-length: %d\r\n" % length)
        if not keep_alive or self.server.shutting_down:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        return b"".join(head)

    def _reply(
        self,
        status: int,
        content_type: bytes,
        extra: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        lines = [b"content-type: " + content_type + b"\r\n"]
        lines.extend(k + b": " + v + b"\r\n" for k, v in extra)
        self._send(self._write_head(status, lines, len(body), keep_alive), body, keep_alive)

    def _send(self, head: bytes, body: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if self.closed or transport is None:
            self.busy = False
            return
        if len(body) < 65536:
            transport.write(head + body)
        else:
            transport.writelines([head, body])
        if not keep_alive or self.server.shutting_down:
            self.close()
            return
        self._next()

    def _next(self) -> None:
        self.busy = False
        if self.pending:
            self._start(self.pending.popleft())
        if len(self.pending) < _MAX_PIPELINED and not self.writing_paused:
            self._resume_reading()

    async def _asgi(self, request: _Request) -> None:
        method, url, headers, body, keep_alive = request
        started = time.monotonic()
        raw_path, _, query = url.partition(b"?")
        client = self.transport.get_extra_info("peername") if self.transport else None
        server = self.transport.get_extra_info("sockname") if self.transport else None
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method.decode("latin-1"),
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": tuple(client[:2]) if client else None,
            "server": tuple(server[:2]) if server else None,
            "state": {},
        }
        sent_body = False
        status = 500
        out_headers: list[bytes] = []
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            if self.disconnected is None:
                self.disconnected = asyncio.Event()
                if self.closed:
                    self.disconnected.set()
            await self.disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() not in _DROPPED_HEADERS or (
                        method == b"HEAD" and name.lower() == b"content-length"
                    ):
                        out_headers.append(bytes(name) + b": " + bytes(value) + b"\r\n")
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        try:
            await self.server.app(scope, receive, send)
        except Exception as exc:
            reply = error_reply(exc, self.server.service.ids.next(), where=scope["path"])
            self._reply(reply.status, reply.content_type, reply.headers, reply.body, keep_alive)
            return
        payload = b"".join(chunks)
        if method == b"HEAD":
            head = [_status_line(status), self.server.date_header, *out_headers]
            if not keep_alive or self.server.shutting_down:
                head.append(b"connection: close\r\n")
            self._send(b"".join([*head, b"\r\n"]), b"", keep_alive)
        else:
            self._send(
                self._write_head(status, out_headers, len(payload), keep_alive), payload, keep_alive
            )
        if self.server.access_log:
            self._log(method, url, status, time.monotonic() - started)

    def _log(self, method: bytes, url: bytes, status: int, seconds: float) -> None:
        record = {
            "method": method.decode("latin-1"),
            "path": url.decode("latin-1"),
            "status": status,
            "seconds": round(seconds, 6),
        }
        access_log.info(orjson.dumps(record).decode())

    def _refuse(self, exc: TorchopsError) -> None:
        """Answer a request that cannot be read to the end, then close the connection."""
        if self.discarding:
            return
        self.discarding = True
        self.pending.clear()
        reply = error_reply(exc, where="http")
        if self.transport is not None and not self.closed:
            lines = [b"content-type: " + reply.content_type + b"\r\n"]
            self.transport.write(self._write_head(reply.status, lines, len(reply.body), False))
            self.transport.write(reply.body)
            # half-close and let the client read the answer before the socket goes away
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.close)

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.busy = False
