"""The service's one error family and the one place that turns errors into HTTP answers."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engines import errors as engine_errors

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error raised by the HTTP layer itself (as opposed to an engine)."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class BodyTooLarge(ServiceError):
    status_code = 413
    code = "body_too_large"


ENGINE_ERROR_STATUS: dict[type[engine_errors.EngineError], int] = {
    engine_errors.ModelNotFound: 404,
    engine_errors.ModelNotReady: 503,
    engine_errors.UnsupportedImage: 415,
    engine_errors.InvalidImage: 422,
    engine_errors.ImageTooSmall: 422,
    engine_errors.ImageTooLarge: 413,
    engine_errors.InvalidParameters: 422,
    engine_errors.UnsupportedModel: 422,
    engine_errors.TooMuchWork: 422,
    engine_errors.DeadlineExceeded: 504,
    engine_errors.Overloaded: 503,
    engine_errors.OverBudget: 503,
    engine_errors.InvalidModel: 500,
    engine_errors.InferenceFailed: 500,
}

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


RETRY_AFTER_SECONDS = 1


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse(
        status_code=status,
        content={"error": {"code": code, "message": message}},
        headers=headers,
    )


def engine_status(exc: engine_errors.EngineError) -> int:
    for cls in type(exc).__mro__:
        if cls in ENGINE_ERROR_STATUS:
            return ENGINE_ERROR_STATUS[cls]
    return 500


def describe_validation_error(exc: RequestValidationError | ValidationError) -> str:
    """The first few problems of a request that failed validation, as `field.path: message`."""
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    async def on_service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(exc.status_code, exc.code, exc.message)

    async def on_engine_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, engine_errors.EngineError)
        status = engine_status(exc)
        if status == 500:
            log.error("engine error %s: %s", exc.code, exc.message, exc_info=exc)
        return error_response(status, exc.code, exc.message)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", describe_validation_error(exc))

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI and Starlette answer an unparsable body with a bare 400; ours is 422.
            return error_response(422, "invalid_request", str(exc.detail))
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Internals stay in the log; the caller gets no type names or tracebacks.
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(engine_errors.EngineError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
