import time
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError

from engines.explain import Explained
from engines.images import decode_image, preprocess
from engines.methods import EXPLAINERS
from engines.model import LoadedModel
from schemas.explain import ExplainRequest, ExplainResponse, Explanation, OutputOptions
from schemas.predict import Prediction
from service.errors import InvalidRequest
from service.heatmaps import check_output, render_maps
from service.inputs import describe_validation_error, read_image_request
from service.routes.models import ERRORS, ModelName
from service.state import State

router = APIRouter(prefix="/v1/models", tags=["explain"])

EXPLAIN_REQUEST_BODY: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": ExplainRequest.model_json_schema(),
                "example": {
                    "image": "<base64 of a PNG/JPEG/WebP>",
                    "method": "gradcam",
                    "top_k": 1,
                    "params": {},
                    "output": {"format": ["overlay", "array"], "size": "input"},
                },
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "method"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "method": {"type": "string"},
                        "targets": {"type": "string", "description": "JSON list"},
                        "top_k": {"type": "integer"},
                        "params": {"type": "string", "description": "JSON object"},
                        "output": {"type": "string", "description": "JSON object"},
                    },
                }
            },
        },
    }
}


def _milliseconds(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


def _resolve_targets(model: LoadedModel, request: ExplainRequest) -> list[int] | None:
    if request.targets is None:
        return None
    resolved: list[int] = []
    for target in request.targets:
        index = model.resolve_target(target)
        if index not in resolved:
            resolved.append(index)
    return resolved


def _render(
    explained: Explained, model: LoadedModel, image: np.ndarray, output: OutputOptions
) -> list[Explanation]:
    maps = [target_map.heatmap for target_map in explained.maps]
    rendered = render_maps(maps, image, model.config.input, output)
    return [
        Explanation(
            target=target_map.target,
            label=model.label(target_map.target),
            heatmap=payloads[0],
            heatmaps=payloads,
        )
        for target_map, payloads in zip(explained.maps, rendered, strict=True)
    ]


@router.post(
    "/{name}/explain",
    response_model=ExplainResponse,
    responses=ERRORS,
    openapi_extra=EXPLAIN_REQUEST_BODY,
    summary="Heatmaps of what the model looked at, one per target class.",
)
async def explain(name: ModelName, request: Request, state: State) -> ExplainResponse:
    started = time.perf_counter()
    model = state.repository.get(name)
    parsed, image_bytes = await read_image_request(request, ExplainRequest)
    explainer = EXPLAINERS[parsed.method]
    try:
        params: Any = explainer.params_model.model_validate(parsed.params)
    except ValidationError as exc:
        raise InvalidRequest("params." + describe_validation_error(exc)) from exc
    targets = _resolve_targets(model, parsed)
    image = await anyio.to_thread.run_sync(decode_image, image_bytes, state.image_limits)
    check_output(parsed.output, image.shape, model.config.input)
    tensor = preprocess([image], model.config.input)
    decoded = time.perf_counter()
    explained = await anyio.to_thread.run_sync(
        explainer.explain,
        model,
        tensor,
        targets,
        parsed.top_k,
        params,
        state.work_limits,
        limiter=state.inference_limiter,
    )
    computed = time.perf_counter()
    explanations = await anyio.to_thread.run_sync(_render, explained, model, image, parsed.output)
    finished = time.perf_counter()
    predictions = model.top_predictions(explained.probabilities, max(parsed.top_k, 5))
    return ExplainResponse(
        model=name,
        method=parsed.method,
        predictions=[Prediction(index=p.index, label=p.label, score=p.score) for p in predictions],
        explanations=explanations,
        timings_ms={
            "decode": _milliseconds(started, decoded),
            "explain": _milliseconds(decoded, computed),
            "render": _milliseconds(computed, finished),
            "total": _milliseconds(started, finished),
        },
    )
