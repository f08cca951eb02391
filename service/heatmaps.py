"""Rendered maps -> the heatmap payloads of every explanation response, one per format.

The pixel work is `engines.imaging.render`'s (one call, `render_maps`); this is the shaping:
base64 and the response schemas, and the size check of `json` before any work.
"""

import base64

import numpy as np

from engines.imaging import render
from schemas.explain import OutputOptions
from schemas.heatmap import (
    MAX_JSON_VALUES,
    ArrayHeatmap,
    ColormapHeatmap,
    HeatmapFormat,
    HeatmapPayload,
    ImageNormalization,
    JsonHeatmap,
    OverlayHeatmap,
    Png16Heatmap,
    PngHeatmap,
)
from schemas.model_config import InputSpec
from service.errors import InvalidRequest


def check_output(options: OutputOptions, image_shape: tuple[int, ...], spec: InputSpec) -> None:
    """Refuse, before any work, an output whose maps would be too large for their format."""
    if "json" not in options.formats:
        return
    geometry = render.output_geometry(image_shape[0], image_shape[1], spec, options.size)
    _check_json_size(geometry.height, geometry.width)


def _check_json_size(height: int, width: int) -> None:
    if height * width > MAX_JSON_VALUES:
        raise InvalidRequest(
            f"output: format `json` is limited to {MAX_JSON_VALUES} values a map; these maps "
            f"would be {height}x{width} = {height * width}. Ask for a smaller `size` or use "
            "`array`"
        )


def render_maps(
    maps: list[np.ndarray], image: np.ndarray, spec: InputSpec, options: OutputOptions
) -> list[list[HeatmapPayload]]:
    """Maps at model resolution -> for each, the payloads of every requested format."""
    if "json" in options.formats:
        check_output(options, image.shape, spec)
    rendered = render.render_maps(maps, image, spec, options)
    return [[payload(encoded, options) for encoded in formats] for formats in rendered]


def heatmap_payloads(
    heatmap: np.ndarray, options: OutputOptions, base_image: np.ndarray | None = None
) -> list[HeatmapPayload]:
    """A map already at the output size -> its payloads in request order."""
    if "json" in options.formats:
        _check_json_size(*heatmap.shape[:2])
    return [payload(e, options) for e in render.encode_map(heatmap, options, base_image)]


def heatmap_payload(
    heatmap: np.ndarray, fmt: HeatmapFormat, base_image: np.ndarray | None = None, **options: object
) -> HeatmapPayload:
    """One payload; `options` are further `OutputOptions` fields (normalize, colormap, ...)."""
    chosen = OutputOptions.model_validate({**options, "format": fmt})
    return heatmap_payloads(heatmap, chosen, base_image)[0]


def payload(encoded: render.Encoded, options: OutputOptions) -> HeatmapPayload:
    """One rendered format as its response schema."""
    found = encoded.source_range
    if encoded.format == "json":
        assert encoded.values is not None
        values: list[list[float]] = encoded.values.tolist()
        return JsonHeatmap(
            shape=encoded.shape, normalize=options.normalize, source_range=found, values=values
        )
    assert encoded.data is not None
    data = base64.b64encode(encoded.data).decode()
    if encoded.format == "array":
        return ArrayHeatmap(
            dtype=options.dtype,
            shape=encoded.shape,
            normalize=options.normalize,
            source_range=found,
            data=data,
        )
    # The options validator keeps `none` away from PNG formats.
    assert options.normalize != "none"
    normalize: ImageNormalization = options.normalize
    if encoded.format == "png":
        return PngHeatmap(data=data, normalize=normalize, source_range=found)
    if encoded.format == "png16":
        return Png16Heatmap(data=data, normalize=normalize, source_range=found)
    if encoded.format == "colormap":
        return ColormapHeatmap(
            colormap=options.colormap, data=data, normalize=normalize, source_range=found
        )
    return OverlayHeatmap(
        colormap=options.colormap,
        alpha=options.alpha,
        data=data,
        normalize=normalize,
        source_range=found,
    )
