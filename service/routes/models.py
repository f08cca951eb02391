import time
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request

from engines.imaging.decode import decode_image
from engines.models.loaded import LoadedModel
from engines.models.loaded import Prediction as EnginePrediction
from engines.models.repository import ModelEntry
from engines.runtime.memory import MemoryBudget, resident_bytes
from schemas.errors import ErrorResponse
from schemas.models import (
    Layer,
    MemoryUse,
    MethodSupport,
    ModelInfo,
    ModelList,
    ModelSummary,
    WarmGraph,
)
from schemas.predict import Prediction, PredictRequest, PredictResponse
from service.inputs import read_image_request
from service.observability import observe_stages
from service.openapi import request_body
from service.state import State
from service.work import loaded_model, run_engine

router = APIRouter(prefix="/v1/models", tags=["models"])

ModelName = Annotated[str, Path(min_length=1, max_length=64, description="A model's name.")]

ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (404, 413, 415, 422, 503)
}
# Routes that run engine work also answer 504 when it runs past its deadline (`timeout_ms` or
# the service's `request_timeout_seconds`).
WORK_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS,
    504: {"model": ErrorResponse, "description": "The work ran past its deadline."},
}

IMAGE_REQUEST_BODY = request_body(
    PredictRequest, {"image": "<base64 of a PNG/JPEG/WebP>", "top_k": 5}
)


def _summary(entry: ModelEntry) -> ModelSummary:
    return ModelSummary(
        name=entry.name, state=entry.state.value, ready=entry.serves, reason=entry.reason
    )


def _memory(budget: MemoryBudget) -> MemoryUse:
    usage = budget.usage()
    return MemoryUse(
        budget_bytes=usage.limit_bytes,
        used_bytes=usage.resident_bytes + usage.reserved_bytes,
        resident_bytes=usage.by_kind,
        reserved_bytes=usage.reserved_bytes,
        evictions=usage.evictions,
        builds_in_flight=usage.builds_in_flight,
        process_resident_bytes=resident_bytes(),
    )


def _graphs(model: LoadedModel) -> list[WarmGraph]:
    keys = model.gradients.warm_keys(model.default_layer)
    methods: dict[tuple[bool, bool], Literal["gradcam", "saliency", "guided_backprop"]] = {
        (False, False): "gradcam",
        (True, False): "saliency",
        (True, True): "guided_backprop",
    }
    return [
        WarmGraph(
            method=methods[(key.wrt_input, key.guided)],
            layer=key.layer,
            warm=model.gradients.resident(key),
        )
        for key in keys
    ]


@router.get("", response_model=ModelList, summary="Every model in the repository.")
async def list_models(state: State) -> ModelList:
    repository = state.repository
    return ModelList(
        models=[_summary(e) for e in repository.entries()], memory=_memory(repository.budget)
    )


@router.get("/{name}", response_model=ModelInfo, responses=ERRORS, summary="One model's details.")
async def model_info(name: ModelName, state: State) -> ModelInfo:
    entry = state.repository.entry(name)
    info = ModelInfo(**_summary(entry).model_dump())
    model = entry.model
    if model is None:
        return info
    return info.model_copy(
        update={
            "description": model.config.description,
            "sha256": model.sha256,
            "provider": model.session.provider,
            "input": model.config.input,
            "output": model.config.output,
            "labels_count": model.num_classes,
            "layers": [
                Layer(
                    name=layer.name,
                    op_type=layer.op_type,
                    shape=list(layer.shape),
                    layout=layer.layout,
                )
                for layer in model.layers
            ],
            "default_layer": model.default_layer,
            "batch": model.batch_mode,
            "methods": [
                MethodSupport(method=s.method, supported=s.supported, reason=s.reason)
                for s in entry.support
            ],
            "graphs": _graphs(model),
        }
    )


@router.post(
    "/{name}/predict",
    response_model=PredictResponse,
    responses=WORK_ERRORS,
    openapi_extra=IMAGE_REQUEST_BODY,
    summary="Top-k classes for one image (JSON with base64 `image`, or multipart `image`).",
)
async def predict(name: ModelName, request: Request, state: State) -> PredictResponse:
    started = time.perf_counter()
    model = await loaded_model(state, name)
    parsed, image_bytes = await read_image_request(request, PredictRequest)
    times: dict[str, float] = {}

    def work() -> list[list[EnginePrediction]]:
        image = decode_image(image_bytes, state.image_limits)
        times["decoded"] = time.perf_counter()
        return model.predict([image], parsed.top_k)

    (predictions,) = await run_engine(state, parsed.timeout_ms, work)
    finished = time.perf_counter()
    decoded = times["decoded"]
    observe_stages(request, name, decode=decoded - started, inference=finished - decoded)
    return PredictResponse(
        model=name,
        predictions=[Prediction(index=p.index, label=p.label, score=p.score) for p in predictions],
        timings_ms={
            "decode": round((decoded - started) * 1000, 3),
            "inference": round((finished - decoded) * 1000, 3),
            "total": round((finished - started) * 1000, 3),
        },
    )
