"""The ASGI application: Open Inference Protocol v2 REST, repository, stats and metrics.

``create_app`` returns a ``TorchopsApp``: a thin ASGI callable that answers the infer
route itself (raw ASGI, no routing, no pydantic) and hands every other path to a FastAPI
app, whose OpenAPI page (``/docs``) documents the whole API, infer included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import torchops
from torchops.errors import InvalidInput, PayloadTooLarge, TorchopsError, Unavailable
from torchops.serving._routes import guarded, to_response
from torchops.serving.codec import json_object
from torchops.serving.errors import Reply, error_reply, json_reply
from torchops.serving.monitoring import add_monitoring_routes
from torchops.serving.served import ServedVersion
from torchops.serving.service import InferenceService, match_infer, parse_version
from torchops.serving.stats import model_stats

__all__ = ["EXTENSIONS", "TorchopsApp", "create_app"]

log = logging.getLogger("torchops.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics"]

_INFER_BODY: dict[str, Any] = {
    "required": True,
    "description": (
        "An OIP v2 inference request. With `Inference-Header-Content-Length` the JSON part is "
        "followed by binary tensor data (inputs with `parameters.binary_data_size`)."
    ),
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "shape", "datatype"],
                            "properties": {
                                "name": {"type": "string"},
                                "shape": {"type": "array", "items": {"type": "integer"}},
                                "datatype": {"type": "string", "example": "FP32"},
                                "parameters": {"type": "object"},
                                "data": {"type": "array", "items": {}},
                            },
                        },
                    },
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                },
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_AUTH: dict[str, Any] = {"security": [{"bearer": []}]}


def _header(headers: Any, name: str) -> bytes | None:
    value = headers.get(name)
    return None if value is None else str(value).encode("latin-1")


class TorchopsApp:
    """ASGI entry point: infer on the fast path, the rest through ``api`` (FastAPI)."""

    def __init__(self, service: InferenceService, api: FastAPI) -> None:
        self.service = service
        self.api = api
        self.max_body_bytes = service.max_body_bytes

    async def startup(self) -> None:
        monitor = self.service.monitor
        if monitor is not None:
            await asyncio.to_thread(monitor.start)
        await self.service.manager.start()
        if monitor is not None:
            for name in self.service.manager.routes:
                monitor.watch(name)

    async def shutdown(self) -> None:
        self.service.shutting_down = True
        await self.service.manager.close()
        if self.service.monitor is not None:  # after the last request was answered
            await asyncio.to_thread(self.service.monitor.close)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope["method"] == "POST":
            target = match_infer(scope["path"])
            if target is not None:
                await self._infer(scope, receive, send, target[0], target[1])
                return
        elif kind == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.api(scope, receive, send)

    async def _infer(
        self, scope: Scope, receive: Receive, send: Send, model: str, version: str | None
    ) -> None:
        length = encoding = auth = rid = declared = None
        for key, value in scope["headers"]:
            if key == b"inference-header-content-length":
                length = value
            elif key == b"content-length":
                declared = value
            elif key == b"content-encoding":
                encoding = value
            elif key == b"authorization":
                auth = value
            elif key == b"x-request-id":
                rid = value
        try:
            body = await read_body(receive, declared, self.max_body_bytes)
        except TorchopsError as exc:
            reply = error_reply(exc, where=f"POST {scope['path']}")
        else:
            reply = await self.service.infer(model, version, body, length, encoding, auth, rid)
        await send_reply(send, reply)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes with ``PayloadTooLarge``."""
    if declared is not None:
        if not declared.strip().isdigit():
            raise InvalidInput("the Content-Length header is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes"
            )
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def send_reply(send: Send, reply: Reply) -> None:
    headers = [
        (b"content-type", reply.content_type),
        (b"content-length", str(len(reply.body)).encode()),
        *reply.headers,
    ]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


def create_app(service: InferenceService) -> TorchopsApp:
    """The ASGI app serving ``service``'s models; lifespan starts and stops the manager."""
    api = FastAPI(
        title="torchops inference server",
        version=torchops.__version__,
        description=(
            "Open Inference Protocol v2 (KServe V2 / Triton HTTP) with the binary tensor data, "
            "classification, model repository and statistics extensions. Repository calls "
            "need `Authorization: Bearer <token>`."
        ),
    )
    _routes(api, service)
    add_monitoring_routes(api, service)
    _handlers(api)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(
                title=api.title, version=api.version, description=api.description, routes=api.routes
            )
            components = schema.setdefault("components", {})
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return TorchopsApp(service, api)


def _handlers(api: FastAPI) -> None:
    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return to_response(json_reply({"error": str(exc.detail)}, exc.status_code))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return to_response(json_reply({"error": f"invalid request: {exc}"}, 400))

    api.add_exception_handler(StarletteHTTPException, on_http_error)
    api.add_exception_handler(RequestValidationError, on_validation_error)


def _routes(api: FastAPI, service: InferenceService) -> None:
    manager = service.manager

    async def served(model: str, version: str | None) -> ServedVersion:
        if version is None:
            return manager.route(model)
        return await manager.version(model, parse_version(version))

    @api.get("/v2", tags=["health"], summary="Server metadata")
    async def server_metadata() -> Response:
        return to_response(
            json_reply(
                {"name": "torchops", "version": torchops.__version__, "extensions": EXTENSIONS}
            )
        )

    @api.get("/v2/health/live", tags=["health"], summary="Liveness")
    async def live() -> Response:
        return to_response(json_reply({"live": True}))

    @api.get("/v2/health/ready", tags=["health"], summary="Readiness (503 until ready)")
    async def ready() -> Response:
        if service.shutting_down:
            return to_response(json_reply({"error": "the server is shutting down"}, 503))
        if not manager.ready:
            return to_response(json_reply({"error": "the server is starting"}, 503))
        return to_response(json_reply({"ready": True}))

    async def metadata(request: Request, model: str, version: str | None) -> Response:
        async def work() -> Reply:
            target = await served(model, version)
            return json_reply(target.metadata(manager.served_versions(model)))

        return await guarded(service.ids, request, work)

    async def model_ready(request: Request, model: str, version: str | None) -> Response:
        async def work() -> Reply:
            target = await served(model, version)
            if service.shutting_down:
                raise Unavailable("the server is shutting down")
            return json_reply({"name": model, "version": target.version_str, "ready": True})

        return await guarded(service.ids, request, work)

    async def stats(request: Request, model: str | None, version: str | None) -> Response:
        async def work() -> Reply:
            if model is None:
                targets = [(m, v) for m in list(manager.routes) for v in manager.served_versions(m)]
            elif version is None:
                manager.route(model)
                targets = [(model, v) for v in manager.served_versions(model)]
            else:
                targets = [(model, (await served(model, version)).version)]
            return json_reply({"model_stats": [model_stats(manager.metrics, *t) for t in targets]})

        return await guarded(service.ids, request, work)

    @api.get("/v2/models/stats", tags=["statistics"], summary="Statistics of every model")
    async def all_stats(request: Request) -> Response:
        return await stats(request, None, None)

    @api.get("/v2/models/{model}/stats", tags=["statistics"], summary="Model statistics")
    async def model_statistics(request: Request, model: str) -> Response:
        return await stats(request, model, None)

    @api.get("/v2/models/{model}/versions/{version}/stats", tags=["statistics"])
    async def version_statistics(request: Request, model: str, version: str) -> Response:
        return await stats(request, model, version)

    @api.get("/v2/models/{model}", tags=["models"], summary="Model metadata")
    async def model_metadata(request: Request, model: str) -> Response:
        return await metadata(request, model, None)

    @api.get("/v2/models/{model}/versions/{version}", tags=["models"], summary="Version metadata")
    async def version_metadata(request: Request, model: str, version: str) -> Response:
        return await metadata(request, model, version)

    async def config(request: Request, model: str, version: str | None) -> Response:
        async def work() -> Reply:
            return json_reply((await served(model, version)).config())

        return await guarded(service.ids, request, work)

    @api.get("/v2/models/{model}/config", tags=["models"], summary="Triton-style model config")
    async def model_config(request: Request, model: str) -> Response:
        return await config(request, model, None)

    @api.get("/v2/models/{model}/versions/{version}/config", tags=["models"])
    async def version_config(request: Request, model: str, version: str) -> Response:
        return await config(request, model, version)

    @api.get("/v2/models/{model}/ready", tags=["models"], summary="Model readiness")
    async def ready_model(request: Request, model: str) -> Response:
        return await model_ready(request, model, None)

    @api.get("/v2/models/{model}/versions/{version}/ready", tags=["models"])
    async def ready_version(request: Request, model: str, version: str) -> Response:
        return await model_ready(request, model, version)

    async def infer(request: Request, model: str, version: str | None) -> Response:
        headers = request.headers
        try:
            body = await read_body(
                request.receive, _header(headers, "content-length"), service.max_body_bytes
            )
        except TorchopsError as exc:
            return to_response(error_reply(exc, where=f"POST {request.url.path}"))
        reply = await service.infer(
            model,
            version,
            body,
            _header(headers, "inference-header-content-length"),
            _header(headers, "content-encoding"),
            _header(headers, "authorization"),
            _header(headers, "x-request-id"),
        )
        return to_response(reply)

    extra = {"requestBody": _INFER_BODY}

    @api.post("/v2/models/{model}/infer", tags=["inference"], openapi_extra=extra)
    async def infer_model(request: Request, model: str) -> Response:
        """Run inference on the version the model's alias points to."""
        return await infer(request, model, None)

    @api.post(
        "/v2/models/{model}/versions/{version}/infer", tags=["inference"], openapi_extra=extra
    )
    async def infer_version(request: Request, model: str, version: str) -> Response:
        """Run inference on one version (loaded on first use)."""
        return await infer(request, model, version)

    @api.post("/v2/repository/index", tags=["repository"], openapi_extra=_AUTH)
    async def repository_index(request: Request) -> Response:
        """Every registered model with its state (READY or UNAVAILABLE)."""

        async def work() -> Reply:
            service.check_token(request.headers.get("authorization"))
            entries = await manager.index()
            body = await request.body()
            if body.strip():
                options = json_object(body)
                if options.get("ready") is True:
                    entries = [e for e in entries if e["state"] == "READY"]
            return json_reply(entries)

        return await guarded(service.ids, request, work)

    @api.post("/v2/repository/models/{model}/load", tags=["repository"], openapi_extra=_AUTH)
    async def load(request: Request, model: str) -> Response:
        """Serve the model (again), following its alias; undoes an explicit unload."""

        async def work() -> Reply:
            service.check_token(request.headers.get("authorization"))
            body = await request.body()
            if body.strip():
                parameters = json_object(body).get("parameters") or {}
                if parameters:
                    raise InvalidInput(
                        "load parameters (config, files) are not supported: models come from "
                        "the registry"
                    )
            await manager.load(model)
            return json_reply({})

        return await guarded(service.ids, request, work)

    @api.post("/v2/repository/models/{model}/unload", tags=["repository"], openapi_extra=_AUTH)
    async def unload(request: Request, model: str) -> Response:
        """Stop serving the model until it is loaded again, whatever its aliases say."""

        async def work() -> Reply:
            service.check_token(request.headers.get("authorization"))
            await manager.unload(model)
            return json_reply({})

        return await guarded(service.ids, request, work)

    @api.get("/metrics", tags=["metrics"], summary="Prometheus metrics")
    async def metrics() -> Response:
        body, content_type = manager.metrics.render()
        return Response(body, 200, media_type=content_type)
