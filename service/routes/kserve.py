"""KServe's V1 protocol: `POST /v1/models/{name}:predict` and `POST /v1/models/{name}:explain`.

A KServe or Seldon client sends `{"instances": [...]}`: encoded images in KServe's binary
convention (`{"image": {"b64": ...}}`), or tensors in the model's own input shape. `:explain`
takes our explain fields beside the instances. One prediction (and one list of explanations)
per instance, in order. `GET /v1/models/{name}` already answers `name` and `ready`, as V1 asks.
"""

import base64
import binascii
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ValidationError

from engines.errors import InvalidImage, InvalidParameters
from engines.imaging.decode import decode_image, preprocess
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import LoadedModel
from schemas.kserve import (
    Binary,
    ExplainAnswer,
    ExplainInstances,
    ImageInstance,
    Instance,
    PredictAnswer,
    PredictInstances,
)
from schemas.predict import Prediction
from service.errors import InvalidRequest, describe_validation_error
from service.explaining import render_explanations, resolve_targets
from service.heatmaps import check_output
from service.inputs import read_json_body
from service.openapi import request_body
from service.routes.models import WORK_ERRORS, ModelName
from service.state import ServiceState, State
from service.work import loaded_model, run_engine

router = APIRouter(prefix="/v1/models", tags=["kserve v1"])


def _instance(
    instance: Instance, model: LoadedModel, state: ServiceState
) -> tuple[np.ndarray | None, np.ndarray]:
    """The decoded image (None for a tensor instance) and the (1, ...) model input."""
    if isinstance(instance, ImageInstance | Binary):
        encoded = instance.image.b64 if isinstance(instance, ImageInstance) else instance.b64
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidImage("an instance's `b64` is not valid base64") from exc
        image = decode_image(data, state.image_limits)
        return image, preprocess([image], model.config.input)
    shape = model.config.input.image_dims
    try:
        tensor = np.asarray(instance, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidParameters("a tensor instance must be a nested list of numbers") from exc
    if tensor.shape != shape:
        raise InvalidParameters(f"a tensor instance has shape {list(tensor.shape)}, not {shape}")
    if not np.isfinite(tensor).all():
        raise InvalidParameters("a tensor instance holds a value that is not finite")
    return None, tensor[None]


def _predictions(model: LoadedModel, probabilities: np.ndarray, top_k: int) -> list[Prediction]:
    return [
        Prediction(index=p.index, label=p.label, score=p.score)
        for p in model.top_predictions(probabilities, top_k)
    ]


@router.post(
    "/{name}:predict",
    operation_id="kserve_v1_predict",
    response_model=PredictAnswer,
    responses=WORK_ERRORS,
    openapi_extra=request_body(PredictInstances, multipart=False),
    summary="KServe V1: the top-k classes of every instance.",
)
async def predict_instances(name: ModelName, request: Request, state: State) -> PredictAnswer:
    model = await loaded_model(state, name)
    parsed = await read_json_body(request, PredictInstances)

    def work() -> PredictAnswer:
        tensors = [_instance(instance, model, state)[1] for instance in parsed.instances]
        probabilities = model.to_probabilities(model.forward(np.concatenate(tensors)))
        return PredictAnswer(
            predictions=[_predictions(model, row, parsed.top_k) for row in probabilities]
        )

    answer: PredictAnswer = await run_engine(state, parsed.timeout_ms, work)
    return answer


@router.post(
    "/{name}:explain",
    operation_id="kserve_v1_explain",
    response_model=ExplainAnswer,
    responses=WORK_ERRORS,
    openapi_extra=request_body(ExplainInstances, multipart=False),
    summary="KServe V1: the heatmaps of every instance, by our explain fields.",
)
async def explain_instances(name: ModelName, request: Request, state: State) -> ExplainAnswer:
    model = await loaded_model(state, name)
    parsed = await read_json_body(request, ExplainInstances)
    explainer = EXPLAINERS[parsed.method]
    try:
        params: Any = explainer.params_model.model_validate(parsed.params)
    except ValidationError as exc:
        raise InvalidRequest("params." + describe_validation_error(exc)) from exc
    targets = resolve_targets(model, parsed.targets)
    spec = model.config.input

    def work() -> ExplainAnswer:
        predictions, explanations = [], []
        for instance in parsed.instances:
            image, tensor = _instance(instance, model, state)
            output = parsed.output
            if image is None:  # already the model's input: its maps are at the model's size
                if "overlay" in output.formats:
                    raise InvalidRequest("output: `overlay` needs an image instance, not a tensor")
                image = np.zeros((spec.height, spec.width, 3), np.uint8)
                output = output.model_copy(update={"size": "model"})
            check_output(output, image.shape, spec)
            explained = explainer.explain(
                model, tensor, targets, parsed.top_k, params, state.work_limits
            )
            predictions.append(_predictions(model, explained.probabilities, 5))
            explanations.append(render_explanations(explained, model, image, output))
        return ExplainAnswer(predictions=predictions, explanations=explanations)

    answer: ExplainAnswer = await run_engine(state, parsed.timeout_ms, work)
    return answer
