"""Insight views of a model: its layer summary, a Conv layer's filters, feature maps."""

import base64
import functools
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from engines.errors import InvalidParameters
from engines.imaging.decode import decode_image, preprocess
from engines.insight import views as insight
from engines.methods.cam import channels_first
from engines.models.loaded import LoadedModel
from schemas.insight import (
    MAX_CHANNELS,
    MAX_FILTERS_PAGE,
    ActivationsRequest,
    ActivationsResponse,
    FilterFormat,
    FiltersResponse,
    FloatArray,
    LayerActivations,
    ModelSummaryTable,
    PngGrid,
    SummaryRow,
)
from service.inputs import read_image_request
from service.openapi import request_body
from service.routes.models import ERRORS, WORK_ERRORS, ModelName
from service.state import State
from service.work import loaded_model, run_engine

router = APIRouter(prefix="/v1/models", tags=["insight"])

SUMMARY_RESPONSES: dict[int | str, dict[str, object]] = {
    **WORK_ERRORS,
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
}

ACTIVATIONS_BODY = request_body(ActivationsRequest)


def prefers_text(accept: str) -> bool:
    """Whether an Accept header ranks text/plain above application/json."""
    ranks: dict[str, float] = {}
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        quality = 1.0
        for param in fields[1:]:
            if param.lower().startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        ranks[media] = max(quality, ranks.get(media, 0.0))

    def rank(media: str) -> float:
        major = media.split("/")[0]
        for key in (media, f"{major}/*", "*/*"):
            if key in ranks:
                return ranks[key]
        return 0.0

    text = ranks.get("text/plain", ranks.get("text/*", 0.0))
    return text > 0 and text > rank("application/json")


def _floats(values: np.ndarray) -> FloatArray:
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return FloatArray(shape=list(values.shape), data=base64.b64encode(data).decode("ascii"))


def _grid(grid: insight.Grid) -> PngGrid:
    return PngGrid(
        data=base64.b64encode(grid.png).decode("ascii"),
        rows=grid.rows,
        cols=grid.cols,
        tile=grid.tile,
        tiles=grid.tiles,
        color="rgb" if grid.color == "rgb" else "gray",
    )


def _summary(model: LoadedModel) -> insight.Summary:
    graph = model.graph
    return insight.summarize(graph, model.input_name, model.config.input)


@router.get(
    "/{name}/summary",
    response_model=ModelSummaryTable,
    responses=SUMMARY_RESPONSES,
    summary="The layer table: node, op, output shape, parameters (text/plain on request).",
)
async def model_summary(
    name: ModelName, request: Request, state: State
) -> ModelSummaryTable | PlainTextResponse:
    model = await loaded_model(state, name)
    summary = await run_engine(state, None, functools.partial(_summary, model))
    if prefers_text(request.headers.get("accept", "")):
        return PlainTextResponse(insight.summary_text(summary, name))
    return ModelSummaryTable(
        model=name,
        input_shape=list(summary.input_shape),
        rows=[
            SummaryRow(
                name=row.name,
                op_type=row.op_type,
                output=row.output,
                output_shape=None if row.output_shape is None else list(row.output_shape),
                params=row.params,
            )
            for row in summary.rows
        ],
        total_params=summary.total_params,
        nodes=summary.nodes,
    )


def _filters(
    model: LoadedModel, layer: str | None, offset: int, limit: int, formats: set[str]
) -> tuple[insight.ConvWeights, np.ndarray, insight.FilterGrid | None]:
    conv = insight.conv_weights(model.graph, layer)
    total = conv.weights.shape[0]
    if offset >= total:
        raise InvalidParameters(f"offset: {offset} is past the last filter ({total} filters)")
    page = conv.weights[offset : offset + limit]
    grid = insight.filter_grid(page) if "png" in formats else None
    return conv, page, grid


@router.get(
    "/{name}/filters",
    response_model=FiltersResponse,
    responses=WORK_ERRORS,
    summary="A Conv layer's weights as a PNG grid and/or float32 arrays, paginated.",
)
async def filters(
    name: ModelName,
    state: State,
    layer: Annotated[
        str | None,
        Query(min_length=1, max_length=1024, description="Conv node or output name."),
    ] = None,
    offset: Annotated[int, Query(ge=0, le=1 << 30)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_FILTERS_PAGE)] = 64,
    format: Annotated[
        list[FilterFormat] | None,
        Query(max_length=2, description="`png`, `array`, or both (repeat the parameter)."),
    ] = None,
) -> FiltersResponse:
    model = await loaded_model(state, name)
    formats = set(format or ["png"])
    conv, page, grid = await run_engine(
        state, None, functools.partial(_filters, model, layer, offset, limit, formats)
    )
    bias = None
    if "array" in formats and conv.bias is not None:
        bias = _floats(conv.bias[offset : offset + limit])
    return FiltersResponse(
        model=name,
        layer=conv.name,
        output=conv.output,
        kernel_shape=list(conv.weights.shape),
        total=conv.weights.shape[0],
        offset=offset,
        limit=limit,
        count=page.shape[0],
        channels_shown=grid.channels_shown if grid is not None else page.shape[1],
        grid=_grid(grid.grid) if grid is not None else None,
        weights=_floats(page) if "array" in formats else None,
        bias=bias,
    )


def _activations(
    model: LoadedModel, image: np.ndarray, parsed: ActivationsRequest
) -> list[LayerActivations]:
    known = {layer.name for layer in model.layers}
    for layer in parsed.layers:
        if layer not in known:
            raise InvalidParameters(
                f"layers: {layer!r} is not one of the model's spatial layers (GET /v1/models/"
                f"{model.name} lists them)"
            )
    batch = preprocess([image], model.config.input)
    results: list[LayerActivations] = []
    for layer in dict.fromkeys(parsed.layers):
        raw = model.layer_activations(batch, layer)
        maps = np.ascontiguousarray(channels_first(raw, model.layer(layer).channel_axis)[0])
        channels = insight.pick_channels(maps.shape[0], parsed.channels, MAX_CHANNELS, layer)
        results.append(
            LayerActivations(
                layer=layer,
                shape=list(raw.shape),
                channels_total=maps.shape[0],
                channels=channels,
                grid=(
                    _grid(insight.activation_grid(maps, channels))
                    if parsed.format == "grid"
                    else None
                ),
                array=_floats(maps[channels]) if parsed.format == "array" else None,
            )
        )
    return results


@router.post(
    "/{name}/activations",
    response_model=ActivationsResponse,
    responses={**ERRORS, **WORK_ERRORS},
    openapi_extra=ACTIVATIONS_BODY,
    summary="Feature maps of 1-8 layers for one image, as PNG grids or float32 arrays.",
)
async def activations(name: ModelName, request: Request, state: State) -> ActivationsResponse:
    model = await loaded_model(state, name)
    parsed, image_bytes = await read_image_request(request, ActivationsRequest)
    image = await anyio.to_thread.run_sync(decode_image, image_bytes, state.image_limits)
    layers = await run_engine(
        state, parsed.timeout_ms, functools.partial(_activations, model, image, parsed)
    )
    return ActivationsResponse(model=name, layers=layers)
