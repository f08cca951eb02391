"""Per-request context: the request id, one log line and the request metrics, in one thin
pure-ASGI middleware; and the helpers routes call to label and time their work."""

import logging
import re
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engines.errors import ModelNotFound
from engines.models.repository import ModelRepository
from service.errors import error_response
from service.lifecycle import Drain
from service.logs import request_id_var
from service.metrics import ServiceMetrics, metrics_of

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_RECORD_KEY = "onnx_explain.request"
_MAX_LOGGED_PATH = 256

# The `method` label of a route, by its endpoint's name; explain routes label themselves with
# the explanation method (`label_request`). Unmatched requests (404, 401, 413) are "none".
ROUTE_METHODS = {
    "predict": "predict",
    "model_info": "info",
    "list_models": "list",
    "explain": "explain",
    "index": "page",
}

access_log = logging.getLogger("service.access")


@dataclass
class RequestRecord:
    """What a route tells the middleware about its request (kept in the ASGI scope)."""

    request_id: str
    method: str | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(scope: Scope) -> str:
    """The caller's `X-Request-ID` when it is 1-128 of [A-Za-z0-9._-], else a new uuid4 hex."""
    for key, value in scope.get("headers", []):
        if key == _REQUEST_ID_KEY:
            text = value.decode("latin-1")
            return text if _VALID_REQUEST_ID.fullmatch(text) else new_request_id()
    return new_request_id()


def label_request(request: Request, method: str) -> None:
    """Name the request's `method` in the metrics and the log line (an explain method)."""
    record = request.scope.get(_RECORD_KEY)
    if isinstance(record, RequestRecord):
        record.method = method


def observe_stages(request: Request, model: str, **seconds: float) -> None:
    """Time stages of a request: `observe_stages(request, name, decode=..., inference=...)`."""
    metrics = metrics_of(request.app)
    if metrics is None:
        return
    for stage, value in seconds.items():
        metrics.observe_stage(stage, model, value)


class RequestContextMiddleware:
    """Gives every HTTP request an id (echoed in `X-Request-ID`, also on errors), counts and
    times it in the metrics, and logs one line for it when it ends."""

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, drain: Drain, repository: ModelRepository
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.drain = drain
        self.repository = repository

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope)
        # Not reset afterwards: each request runs in a task of its own, whose context ends
        # with it, and the error handler that runs after this middleware still logs the id.
        request_id_var.set(request_id)
        record = RequestRecord(request_id)
        scope[_RECORD_KEY] = record
        id_header = (_REQUEST_ID_KEY, request_id.encode("ascii"))
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != _REQUEST_ID_KEY]
                headers.append(id_header)
                if self.drain.draining and not any(k == b"connection" for k, _ in headers):
                    headers.append((b"connection", b"close"))  # move clients off this process
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            if not response_started:
                # The app's handler for unexpected errors answers outside this middleware;
                # answer here, the same way, so the 500 carries the id. It still logs.
                response = error_response(500, "internal_error", "internal error")
                await response(scope, receive, send_with_id)
            raise
        finally:
            self.metrics.in_flight.dec()
            self._finish(scope, record, status, time.perf_counter() - started)

    def _finish(self, scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
        route_name = getattr(scope.get("route"), "name", None)
        if record.method is not None:
            method = record.method
        elif isinstance(route_name, str):
            method = ROUTE_METHODS.get(route_name, route_name)
        else:
            method = "none"
        model = self._model(scope)
        self.metrics.observe_request(model or "", method, status, seconds)
        fields: dict[str, object] = {
            "method": scope.get("method", ""),
            "path": scope.get("path", "")[:_MAX_LOGGED_PATH],
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": record.request_id,
            "operation": method,
        }
        if model:
            fields["model"] = model
        access_log.log(
            # 503 is routine (loading, draining, at capacity); other 5xx deserve a look.
            logging.WARNING if status >= 500 and status != 503 else logging.INFO,
            "%s %s %d %.1f ms",
            fields["method"],
            fields["path"],
            status,
            seconds * 1000,
            extra=fields,
        )

    def _model(self, scope: Scope) -> str | None:
        """The model named in the path, if the repository has it (bounded label values)."""
        name = scope.get("path_params", {}).get("name")
        if not isinstance(name, str):
            return None
        try:
            self.repository.entry(name)
        except ModelNotFound:
            return None
        return name
