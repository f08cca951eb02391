import contextlib
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from engines.imaging.decode import decode_image, preprocess
from engines.methods.pipeline import Explained
from engines.methods.registry import EXPLAINERS
from engines.runtime import progress
from schemas.explain import ExplainRequest, ExplainResponse, Explanation
from service.errors import InvalidRequest, describe_validation_error
from service.explaining import (
    explain_response,
    measure_faithfulness,
    render_explanations,
    resolve_targets,
)
from service.heatmaps import check_output
from service.inputs import read_image_request
from service.observability import label_request, observe_stages
from service.openapi import request_body
from service.routes.models import WORK_ERRORS, ModelName
from service.state import State
from service.streaming import STREAM_MEDIA_TYPES, progress_emitter, stream_response
from service.work import loaded_model, run_engine

router = APIRouter(prefix="/v1/models", tags=["explain"])


EXPLAIN_REQUEST_BODY = request_body(
    ExplainRequest,
    {
        "image": "<base64 of a PNG/JPEG/WebP>",
        "method": "gradcam",
        "top_k": 1,
        "params": {},
        "output": {"format": ["overlay", "array"], "size": "input"},
    },
)


@router.post(
    "/{name}/explain",
    response_model=ExplainResponse,
    responses={**WORK_ERRORS, 200: {"content": STREAM_MEDIA_TYPES}},
    openapi_extra=EXPLAIN_REQUEST_BODY,
    summary="Heatmaps of what the model looked at, one per target class.",
)
async def explain(
    name: ModelName, request: Request, state: State
) -> ExplainResponse | StreamingResponse:
    started = time.perf_counter()
    model = await loaded_model(state, name)
    parsed, image_bytes = await read_image_request(request, ExplainRequest)
    label_request(request, parsed.method)
    explainer = EXPLAINERS[parsed.method]
    try:
        params: Any = explainer.params_model.model_validate(parsed.params)
    except ValidationError as exc:
        raise InvalidRequest("params." + describe_validation_error(exc)) from exc
    targets = resolve_targets(model, parsed.targets)
    times: dict[str, float] = {}

    def work(listener: progress.Listener | None) -> tuple[Explained, list[Explanation]]:
        # One worker-thread hop for the whole request: each hop costs event-loop turns and
        # thread wake-ups that add up under load.
        image = decode_image(image_bytes, state.image_limits)
        check_output(parsed.output, image.shape, model.config.input)
        tensor = preprocess([image], model.config.input)
        times["decoded"] = time.perf_counter()
        with progress.reporting(listener) if listener else contextlib.nullcontext():
            with progress.stage(parsed.method):
                explained = explainer.explain(
                    model, tensor, targets, parsed.top_k, params, state.work_limits
                )
            metrics = None
            if parsed.metrics:
                metrics = measure_faithfulness(
                    model,
                    image,
                    explained,
                    parsed.metrics,
                    parsed.metric_steps,
                    parsed.curves,
                    state.work_limits,
                )
        times["computed"] = time.perf_counter()
        return explained, render_explanations(explained, model, image, parsed.output, metrics)

    def answer(result: tuple[Explained, list[Explanation]]) -> ExplainResponse:
        explained, explanations = result
        finished = time.perf_counter()
        decoded, computed = times["decoded"], times["computed"]
        observe_stages(
            request,
            name,
            decode=decoded - started,
            inference=computed - decoded,
            render=finished - computed,
        )
        stages = (started, decoded, computed, finished)
        return explain_response(
            name, parsed.method, model, explained, explanations, parsed.top_k, stages
        )

    if parsed.stream:
        return stream_response(
            request,
            state,
            parsed.timeout_ms,
            lambda emit: work(progress_emitter(emit)),
            answer,
        )
    return answer(await run_engine(state, parsed.timeout_ms, lambda: work(None)))
