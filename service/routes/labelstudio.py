"""A Label Studio ML backend per model, at /label-studio/{model}.

Label Studio connects by URL and calls `GET /health`, `POST /setup`, `POST /predict` and
`POST /webhook` (the contract of label-studio-ml-backend's `label_studio_ml/api.py`). A
prediction reads the project's labeling config: a `Choices` tag bound to the image gets the
predicted class (when it is one of its choices), a `BrushLabels` tag a region of the
explanation map's top fraction, in Label Studio's brush RLE. Task images come from the
configured Label Studio only (service.labelstudio); a task whose image is refused or fails gets
an empty result and a logged reason, and the other tasks still get theirs.
"""

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from engines.errors import EngineError
from engines.imaging.brush import mask_rle
from engines.imaging.decode import decode_image, preprocess
from engines.imaging.render import output_geometry, place_map
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import LoadedModel
from schemas.explain import ExplainMethod
from schemas.labelstudio import (
    HealthAnswer,
    PredictAnswer,
    PredictRequest,
    SetupAnswer,
    SetupRequest,
    TaskPrediction,
)
from service.errors import InvalidRequest, describe_validation_error
from service.inputs import read_json_body
from service.labelstudio import (
    LabelingConfig,
    RefusedImage,
    brush_result,
    choice_result,
    fetch_image,
    parse_config,
)
from service.routes.models import WORK_ERRORS, ModelName
from service.state import ServiceState, State
from service.work import loaded_model, run_engine

log = logging.getLogger(__name__)
router = APIRouter(prefix="/label-studio/{name}", tags=["label studio"])

MAX_PROJECTS = 256
"""Projects whose `extra_params` are remembered (least recently set forgotten first)."""


class ProjectParams(BaseModel):
    """What a project's `extra_params` may set."""

    method: ExplainMethod | None = None
    params: dict[str, Any] = Field(default_factory=dict, max_length=32)
    brush_fraction: float | None = Field(default=None, gt=0.0, le=1.0)


@dataclass
class _Projects:
    entries: "OrderedDict[tuple[str, str], ProjectParams]"

    def get(self, model: str, project: str | None) -> ProjectParams:
        found = self.entries.get((model, project or ""))
        return found if found is not None else ProjectParams()

    def set(self, model: str, project: str, params: ProjectParams) -> None:
        self.entries[(model, project)] = params
        self.entries.move_to_end((model, project))
        while len(self.entries) > MAX_PROJECTS:
            self.entries.popitem(last=False)


_projects = _Projects(OrderedDict())


def _project_params(extra: dict[str, Any] | str | None) -> ProjectParams:
    if extra is None or extra == "":
        return ProjectParams()
    try:
        found = json.loads(extra) if isinstance(extra, str) else extra
        return ProjectParams.model_validate(found)
    except (ValueError, ValidationError) as exc:
        raise InvalidRequest(f"extra_params: not the backend's parameters: {exc}") from exc


def _version(model: LoadedModel, name: str, method: str) -> str:
    return f"onnx-explain-{name}-{model.graph_sha256[:12]}-{method}"


@router.get(
    "/health",
    response_model=HealthAnswer,
    responses=WORK_ERRORS,
    summary="Label Studio's backend check.",
)
async def health(name: ModelName, state: State) -> HealthAnswer:
    state.repository.entry(name)  # 404 for an unknown model
    return HealthAnswer(status="UP", model_class=f"onnx-explain:{name}")


@router.post("/setup", response_model=SetupAnswer, responses=WORK_ERRORS)
async def setup(name: ModelName, request: Request, state: State) -> SetupAnswer:
    model = await loaded_model(state, name)
    parsed = await read_json_body(request, SetupRequest)
    params = _project_params(parsed.extra_params)
    _projects.set(name, parsed.project, params)
    return SetupAnswer(
        model_version=_version(model, name, params.method or state.settings.label_studio_method)
    )


@router.post(
    "/webhook",
    responses=WORK_ERRORS,
    summary="Annotation and training events: taken, nothing changes.",
)
async def webhook(name: ModelName, request: Request, state: State) -> dict[str, str]:
    state.repository.entry(name)
    try:
        event = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise InvalidRequest("the webhook body is not JSON") from exc
    action = event.get("action") if isinstance(event, dict) else None
    log.info("label studio event %s for %s: no training here", action, name)
    return {"status": "ok"}


def _top_fraction(heatmap: np.ndarray, fraction: float) -> np.ndarray:
    """The pixels of the `fraction` of the map with the highest values (ties by position)."""
    flat = heatmap.reshape(-1)
    count = round(fraction * flat.size)
    mask = np.zeros(flat.size, bool)
    if count > 0 and np.isfinite(flat).all() and float(flat.max()) > float(flat.min()):
        mask[np.argsort(-flat, kind="stable")[:count]] = True
    return mask.reshape(heatmap.shape)


def _predict_task(
    task: dict[str, Any],
    config: LabelingConfig,
    model: LoadedModel,
    state: ServiceState,
    method: str,
    method_params: Any,
    fraction: float,
) -> tuple[list[dict[str, object]], float]:
    settings = state.settings
    data = task.get("data") if isinstance(task, dict) else None
    reference = data.get(config.image_key) if isinstance(data, dict) else None
    if not isinstance(reference, str):
        raise RefusedImage(f"the task has no `{config.image_key}` image")
    payload = fetch_image(
        reference,
        settings.label_studio_url,
        settings.label_studio_api_key.get_secret_value(),
        settings.max_image_bytes,
        settings.label_studio_fetch_timeout_seconds,
    )
    image = decode_image(payload, state.image_limits)
    tensor = preprocess([image], model.config.input)
    explained = EXPLAINERS[method].explain(model, tensor, None, 1, method_params, state.work_limits)
    (target_map,) = explained.maps
    label = model.label(target_map.target)
    height, width = image.shape[:2]
    geometry = output_geometry(height, width, model.config.input, "input")
    placed = place_map(target_map.heatmap, geometry)
    results: list[dict[str, object]] = []
    for control in config.controls:
        if control.kind == "Choices":
            found = choice_result(control, config.image_name, label)
            if found is not None:
                results.append(found)
        else:
            rle = mask_rle(_top_fraction(placed, fraction))
            results.append(brush_result(control, config.image_name, label, rle, width, height))
    return results, float(explained.probabilities[target_map.target])


@router.post("/predict", response_model=PredictAnswer, responses=WORK_ERRORS)
async def predict(name: ModelName, request: Request, state: State) -> PredictAnswer:
    model = await loaded_model(state, name)
    parsed = await read_json_body(request, PredictRequest)
    config = parse_config(parsed.label_config)
    project = _projects.get(name, parsed.project)
    method = project.method or state.settings.label_studio_method
    if method not in EXPLAINERS:
        raise InvalidRequest(f"unknown method {method!r} for the Label Studio backend")
    explainer = EXPLAINERS[method]
    try:
        method_params = explainer.params_model.model_validate(project.params)
    except ValidationError as exc:
        raise InvalidRequest("extra_params.params." + describe_validation_error(exc)) from exc
    fraction = project.brush_fraction or state.settings.label_studio_brush_fraction
    version = _version(model, name, method)

    def work() -> PredictAnswer:
        answers = []
        for index, task in enumerate(parsed.tasks):
            try:
                result, score = _predict_task(
                    task,
                    config,
                    model,
                    state,
                    method,
                    method_params,
                    fraction,
                )
            except (RefusedImage, EngineError) as exc:
                reason = exc.message if isinstance(exc, EngineError) else str(exc)
                log.warning("label studio task %s of %s: no prediction: %s", index, name, reason)
                result, score = [], 0.0
            answers.append(TaskPrediction(result=result, score=score, model_version=version))
        return PredictAnswer(results=answers)

    answer: PredictAnswer = await run_engine(state, None, work)
    return answer
