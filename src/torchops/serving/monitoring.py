"""The monitoring routes: feedback in, alerts and live quality out (bearer token required).

``POST /v2/models/{m}/feedback`` takes one of three bodies:

- ``{"id": "<request id>", "target": ...}`` → ``{"accepted": 1, "errors": []}``; an unknown
  id answers 404, feedback already given 409, a target that does not fit the model 400.
  For a request that predicted several rows, ``"id"`` with a list of one target per row
  labels them all (rows are observed as ``<id>/0`` … ``<id>/<n-1>``);
- ``{"inputs": [OIP input tensors], "target": ...}`` → the serving version predicts the
  inputs, the predictions are recorded under new request ids and labelled with the
  targets (one per row, a list when there are several rows) →
  ``{"accepted": n, "errors": [], "ids": [...]}``; targets are checked before anything is
  predicted or stored;
- ``{"items": [{"id": ..., "target": ...}, ...]}`` → every item is accepted or refused on
  its own: ``{"accepted": n, "errors": [{"index": i, "error": "..."}]}``.

``GET /v2/models/{m}/alerts`` answers the active alerts, the newest 100 events and the
rules; ``GET /v2/models/{m}/quality[?version=v]`` the live quality windows and the latest
drift report of the serving version (or ``v``). With monitoring off (``--no-monitor``)
they answer 503.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from torchops.errors import InvalidInput, Unavailable
from torchops.monitoring.feedback import normalize_target
from torchops.refs import validate_name
from torchops.serving._routes import guarded
from torchops.serving.codec import decode_request, json_object
from torchops.serving.errors import Reply, json_reply
from torchops.serving.service import InferenceService, parse_version

if TYPE_CHECKING:
    from torchops.monitoring.monitor import Monitor

__all__ = ["add_monitoring_routes"]

_AUTH: dict[str, Any] = {"security": [{"bearer": []}]}
_FEEDBACK_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["id", "target"],
                        "properties": {"id": {"type": "string"}, "target": {}},
                    },
                    {
                        "type": "object",
                        "required": ["inputs", "target"],
                        "properties": {"inputs": {"type": "array"}, "target": {}},
                    },
                    {
                        "type": "object",
                        "required": ["items"],
                        "properties": {"items": {"type": "array"}},
                    },
                ]
            }
        }
    },
}
_FRESH_TIMEOUT_S = 10.0


def _errors(errors: list[tuple[int, str]]) -> list[dict[str, Any]]:
    return [{"index": i, "error": message} for i, message in errors]


def add_monitoring_routes(api: FastAPI, service: InferenceService) -> None:
    """Add the feedback, alerts and quality routes for ``service`` to ``api``."""

    def monitor() -> Monitor:
        if service.monitor is None:
            raise Unavailable("monitoring is off on this server (it was started with --no-monitor)")
        return service.monitor

    @api.post(
        "/v2/models/{model}/feedback",
        tags=["monitoring"],
        summary="Label predictions (by request id, with the inputs, or in a batch)",
        openapi_extra={**_AUTH, "requestBody": _FEEDBACK_BODY},
    )
    async def feedback(request: Request, model: str) -> Response:
        async def work() -> Reply:
            service.check_token(request.headers.get("authorization"))
            mon = monitor()
            validate_name(model)
            data = json_object(await request.body())
            if "items" in data:
                return json_reply(await _batch(mon, model, data["items"]))
            if "target" not in data:
                raise InvalidInput(
                    'the feedback needs a "target", with an "id" or "inputs", or "items"'
                )
            if "inputs" in data:
                return json_reply(await _with_inputs(service, mon, model, data))
            if "id" not in data:
                raise InvalidInput('the feedback needs an "id" (or "inputs") with its "target"')
            result = await asyncio.to_thread(mon.add_feedback, model, data["id"], data["target"])
            return json_reply({"accepted": result.accepted, "errors": _errors(result.errors)})

        return await guarded(service.ids, request, work)

    @api.get(
        "/v2/models/{model}/alerts",
        tags=["monitoring"],
        summary="Active alerts, recent alert events and the alert rules of a model",
        openapi_extra=_AUTH,
    )
    async def alerts(request: Request, model: str) -> Response:
        async def work() -> Reply:
            service.check_token(request.headers.get("authorization"))
            mon = monitor()
            validate_name(model)
            return json_reply(await asyncio.to_thread(mon.alert_summary, model))

        return await guarded(service.ids, request, work)

    @api.get(
        "/v2/models/{model}/quality",
        tags=["monitoring"],
        summary="Live quality windows and the latest drift report of a model version",
        openapi_extra=_AUTH,
    )
    async def quality(request: Request, model: str) -> Response:
        async def work() -> Reply:
            service.check_token(request.headers.get("authorization"))
            mon = monitor()
            validate_name(model)
            raw = request.query_params.get("version")
            version = parse_version(raw) if raw is not None else None
            if version is None and model in service.manager.routes:
                version = service.manager.routes[model].version
            mon.watch(model)

            def read() -> dict[str, Any]:
                mon.writer.flush(_FRESH_TIMEOUT_S)  # feedback just given joins its prediction
                mon.refresh()
                return mon.quality(model, version)

            return json_reply(await asyncio.to_thread(read))

        return await guarded(service.ids, request, work)


async def _batch(mon: Monitor, model: str, items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        raise InvalidInput('"items" must be a list of {"id": ..., "target": ...} objects')
    refused: list[tuple[int, str]] = []
    pairs: list[tuple[str, Any]] = []
    where: list[int] = []
    for index, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or "target" not in item
            or not isinstance(item.get("id"), str)
        ):
            refused.append(
                (index, f'item {index}: expected {{"id": "<request id>", "target": ...}}')
            )
            continue
        pairs.append((item["id"], item["target"]))
        where.append(index)
    result = await asyncio.to_thread(mon.add_feedback_many, model, pairs)
    errors = refused + [(where[i], message) for i, message in result.errors]
    return {"accepted": result.accepted, "errors": _errors(sorted(errors))}


async def _with_inputs(
    service: InferenceService, mon: Monitor, model: str, data: dict[str, Any]
) -> dict[str, Any]:
    served = service.manager.route(model)
    start = time.monotonic()
    body = orjson.dumps({"inputs": data["inputs"]})
    request = decode_request(body, served.signature, reject_nonfinite=service.reject_nonfinite)
    rows = min((int(a.shape[0]) if a.ndim else 1 for a in request.inputs.values()), default=0)
    target = data["target"]
    if rows == 1:
        single = (
            isinstance(target, list)
            and len(target) == 1
            and served.signature.task == ("classification")
        )
        targets = [target[0] if single else target]
    elif isinstance(target, list) and len(target) == rows:
        targets = list(target)
    else:
        raise InvalidInput(
            f'the inputs have {rows} rows: give "target" as a list of {rows} targets'
        )
    for i, value in enumerate(targets):  # check every target before predicting or storing
        try:
            normalize_target(served.signature, value)
        except InvalidInput as exc:
            raise InvalidInput(f"row {i}: {exc.message}") from None
    outputs = await served.batcher.submit(
        request.inputs, deadline=start + service.request_timeout_s
    )
    rid = service.ids.next()
    mon.record(
        model,
        served.version,
        served.signature,
        rid,
        time.monotonic() - start,
        request.inputs,
        outputs,
    )
    ids = [rid] if rows == 1 else [f"{rid}/{i}" for i in range(rows)]
    result = await asyncio.to_thread(
        mon.add_feedback_many, model, list(zip(ids, targets, strict=True))
    )
    return {"accepted": result.accepted, "errors": _errors(result.errors), "ids": ids}
