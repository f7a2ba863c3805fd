"""Send feedback to a running torchops server from Python.

>>> client = FeedbackClient("http://127.0.0.1:8000", token)        # doctest: +SKIP
>>> client.send("digits", response_id, 7)                          # doctest: +SKIP
>>> client.send_many("digits", [(id1, 3), (id2, "4")]).accepted     # doctest: +SKIP
>>> client.send_inputs("digits", {"x": images}, labels)            # doctest: +SKIP

Targets are what the server's feedback route takes: a class index or label for a
classifier, a number or a list shaped like one output row for a regressor. Errors the
server answers come back as the matching ``TorchopsError`` (404 → ``NotFound``,
409 → ``Conflict``, 400 → ``InvalidInput``, 401 → ``Unauthorized``); per-item errors of a
batch are in the ``FeedbackResult``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from torchops.errors import (
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TorchopsError,
    Unauthorized,
    Unavailable,
)
from torchops.monitoring.feedback import FeedbackResult
from torchops.refs import validate_name
from torchops.types import Array

__all__ = ["FeedbackClient"]

_ERRORS: dict[int, type[TorchopsError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    503: Unavailable,
    504: DeadlineExceeded,
}
#: numpy dtype kind+size → Open Inference Protocol datatype
_DATATYPES = {
    "b1": "BOOL",
    "i1": "INT8",
    "i2": "INT16",
    "i4": "INT32",
    "i8": "INT64",
    "u1": "UINT8",
    "u2": "UINT16",
    "u4": "UINT32",
    "u8": "UINT64",
    "f2": "FP16",
    "f4": "FP32",
    "f8": "FP64",
}


class FeedbackClient:
    """Feedback over HTTP: ``POST /v2/models/{model}/feedback`` with a bearer token.

    ``batch_size`` items go in each request of ``send_many``.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        batch_size: int = 1000,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"server URL must start with http:// or https://, got {url!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput(f"batch_size must be a positive integer, got {batch_size!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._input_names: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"FeedbackClient({self.url!r}, batch_size={self.batch_size})"

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, model: str, request_id: str, target: Any) -> None:
        """Label the prediction ``request_id`` (the ``id`` of its inference response)."""
        self._post(model, {"id": request_id, "target": _plain(target)})

    def send_many(self, model: str, items: Sequence[tuple[str, Any]]) -> FeedbackResult:
        """Label many predictions, ``batch_size`` per request; each item stands alone.

        Error indices in the result refer to positions in ``items``.
        """
        accepted = 0
        errors: list[tuple[int, str]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            body = {"items": [{"id": rid, "target": _plain(t)} for rid, t in chunk]}
            answer = self._post(model, body)
            accepted += int(answer.get("accepted", 0))
            for error in answer.get("errors", []):
                errors.append((start + int(error["index"]), str(error["error"])))
        return FeedbackResult(accepted, errors)

    def send_inputs(
        self, model: str, inputs: Mapping[str, Array] | Array, targets: Sequence[Any]
    ) -> list[str]:
        """Have the server predict ``inputs`` (a batch) and label each row with ``targets``.

        Returns the request ids of the predictions the server recorded, one per row.
        """
        arrays = dict(inputs) if isinstance(inputs, Mapping) else {self._input_name(model): inputs}
        tensors = [_tensor(name, np.asarray(a)) for name, a in arrays.items()]
        rows = int(np.asarray(next(iter(arrays.values()))).shape[0]) if arrays else 0
        labels = [_plain(t) for t in targets]
        if rows == 0 or len(labels) != rows:
            raise InvalidInput(f"{len(labels)} targets for {rows} input rows: give one per row")
        answer = self._post(model, {"inputs": tensors, "target": labels if rows > 1 else labels[0]})
        ids = answer.get("ids", [])
        return [str(i) for i in ids]

    # -- HTTP --------------------------------------------------------------------------

    def _post(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        path = f"/v2/models/{quote(validate_name(model), safe='')}/feedback"
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise DeadlineExceeded(f"{self.url} did not answer within {self.timeout_s} s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the torchops server at {self.url}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            text = message or response.text[:200] or response.reason_phrase
            error = _ERRORS.get(response.status_code, TorchopsError)
            hint = " (pass the server's token)" if response.status_code == 401 else ""
            raise error(f"{self.url} answered {response.status_code}: {text}{hint}")
        if not isinstance(data, dict):
            raise TorchopsError(f"{self.url} answered {response.status_code} without a JSON object")
        return data

    def _input_name(self, model: str) -> str:
        name = self._input_names.get(model)
        if name is None:
            meta = self._request("GET", f"/v2/models/{quote(validate_name(model), safe='')}")
            inputs = meta.get("inputs") or []
            if len(inputs) != 1:
                names = [i.get("name") for i in inputs]
                raise InvalidInput(
                    f"model {model!r} has inputs {names}: pass a mapping of input name to array"
                )
            name = str(inputs[0]["name"])
            self._input_names[model] = name
        return name


def _tensor(name: str, array: Array) -> dict[str, Any]:
    datatype = _DATATYPES.get(f"{array.dtype.kind}{array.dtype.itemsize}")
    if datatype is None:
        raise InvalidInput(f"input {name!r}: dtype {array.dtype} has no inference protocol type")
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "data": array.reshape(-1).tolist(),
    }


def _plain(target: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    tolist = getattr(target, "tolist", None)
    return tolist() if callable(tolist) else target
