import time
from typing import Any

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
from service.observability import label_request, observe_stages
from service.routes.models import WORK_ERRORS, ModelName
from service.state import State
from service.work import run_engine

router = APIRouter(prefix="/v1/models", tags=["explain"])


def _inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` written in place of their `$ref`s.

    Inside an OpenAPI document a `#/$defs/...` reference resolves against the document's root,
    which has no `$defs`: the reference would dangle, and tools would fail to read the body.
    """
    definitions: dict[str, Any] = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {key: value for key, value in node.items() if key != "$ref"}
                return inline({**definitions[ref.removeprefix("#/$defs/")], **rest})
            return {key: inline(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


EXPLAIN_JSON_SCHEMA = _inline_definitions(ExplainRequest.model_json_schema())

EXPLAIN_REQUEST_BODY: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": EXPLAIN_JSON_SCHEMA,
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
                        "method": EXPLAIN_JSON_SCHEMA["properties"]["method"],
                        "targets": {"type": "string", "description": "JSON list"},
                        "top_k": EXPLAIN_JSON_SCHEMA["properties"]["top_k"],
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
    responses=WORK_ERRORS,
    openapi_extra=EXPLAIN_REQUEST_BODY,
    summary="Heatmaps of what the model looked at, one per target class.",
)
async def explain(name: ModelName, request: Request, state: State) -> ExplainResponse:
    started = time.perf_counter()
    model = state.repository.get(name)
    parsed, image_bytes = await read_image_request(request, ExplainRequest)
    label_request(request, parsed.method)
    explainer = EXPLAINERS[parsed.method]
    try:
        params: Any = explainer.params_model.model_validate(parsed.params)
    except ValidationError as exc:
        raise InvalidRequest("params." + describe_validation_error(exc)) from exc
    targets = _resolve_targets(model, parsed)
    times: dict[str, float] = {}

    def work() -> tuple[Explained, list[Explanation]]:
        # One worker-thread hop for the whole request: each hop costs event-loop turns and
        # thread wake-ups that add up under load.
        image = decode_image(image_bytes, state.image_limits)
        check_output(parsed.output, image.shape, model.config.input)
        tensor = preprocess([image], model.config.input)
        times["decoded"] = time.perf_counter()
        explained = explainer.explain(
            model, tensor, targets, parsed.top_k, params, state.work_limits
        )
        times["computed"] = time.perf_counter()
        return explained, _render(explained, model, image, parsed.output)

    explained, explanations = await run_engine(state, parsed.timeout_ms, work)
    finished = time.perf_counter()
    decoded, computed = times["decoded"], times["computed"]
    observe_stages(
        request,
        name,
        decode=decoded - started,
        inference=computed - decoded,
        render=finished - computed,
    )
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
