"""POST /v1/models/{name}/maximize: the image that maximizes a class, as JSON or NDJSON steps."""

import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from engines.errors import InvalidParameters
from engines.imaging.render import encode_png
from engines.insight.maximize import Maximized, maximize
from engines.models.loaded import LoadedModel
from schemas.maximize import MaximizeParams, MaximizeRequest, MaximizeResponse, TensorArray
from service.errors import InvalidRequest, UnsupportedMediaType, describe_validation_error
from service.openapi import request_body
from service.routes.models import WORK_ERRORS, ModelName
from service.state import State
from service.streaming import STREAM_MEDIA_TYPES, Emit, stream_response
from service.work import loaded_model, run_engine

router = APIRouter(prefix="/v1/models", tags=["maximize"])


def _response(
    name: str,
    model: LoadedModel,
    target: int,
    parsed: MaximizeRequest,
    result: Maximized,
    started: float,
) -> MaximizeResponse:
    png = encode_png(result.pixels[..., ::-1])  # encode_png takes BGR
    array = None
    if parsed.array:
        array = TensorArray(
            shape=list(result.tensor.shape),
            data=base64.b64encode(result.tensor.astype("<f4").tobytes()).decode(),
        )
    return MaximizeResponse(
        model=name,
        target=target,
        label=model.label(target) if parsed.layer is None else f"{parsed.layer}[{target}]",
        score=result.score,
        scores=result.scores,
        steps=len(result.scores),
        image=base64.b64encode(png).decode(),
        array=array,
        timings_ms={"total": round((time.perf_counter() - started) * 1000, 3)},
    )


def _params(parsed: MaximizeRequest) -> MaximizeParams:
    return MaximizeParams.model_validate(
        parsed.model_dump(include=set(MaximizeParams.model_fields))
    )


async def _read_request(request: Request) -> MaximizeRequest:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in ("", "application/json") and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"content type {media_type[:100]!r} is not accepted: send JSON")
    body = await request.body()
    if not body.strip():
        raise InvalidRequest('request body is empty: send JSON like {"target": 0}')
    try:
        return MaximizeRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from exc


REQUEST_BODY = request_body(
    MaximizeRequest, {"target": 285, "steps": 100, "stream": False}, multipart=False
)


@router.post(
    "/{name}/maximize",
    response_model=MaximizeResponse,
    responses={**WORK_ERRORS, 200: {"content": STREAM_MEDIA_TYPES}},
    openapi_extra=REQUEST_BODY,
    summary="The input that maximizes a class score (activation maximization).",
)
async def maximize_class(
    name: ModelName, request: Request, state: State
) -> MaximizeResponse | StreamingResponse:
    started = time.perf_counter()
    model = await loaded_model(state, name)
    parsed = await _read_request(request)
    if parsed.layer is None:
        target = model.resolve_target(parsed.target)
    elif isinstance(parsed.target, int):
        target = parsed.target
    else:
        raise InvalidParameters("with `layer`, `target` is a channel index")
    params = _params(parsed)
    if parsed.stream:

        def work(emit: Emit) -> Maximized:
            def on_step(step: int, score: float) -> None:
                emit({"step": step, "score": score})

            return maximize(model, target, params, on_step=on_step)

        def answer(result: Maximized) -> MaximizeResponse:
            return _response(name, model, target, parsed, result, started)

        return stream_response(request, state, parsed.timeout_ms, work, answer)
    result = await run_engine(state, parsed.timeout_ms, lambda: maximize(model, target, params))
    return _response(name, model, target, parsed, result, started)
