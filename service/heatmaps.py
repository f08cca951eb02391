"""Engine maps -> the heatmap payloads of every explanation response, one per output format."""

import base64
from collections.abc import Callable
from functools import cached_property

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
    geometry = render.output_geometry(image.shape[0], image.shape[1], spec, options.size)
    base = render.base_image(image, spec, options.size) if "overlay" in options.formats else None
    return [heatmap_payloads(render.place_map(m, geometry), options, base) for m in maps]


def heatmap_payloads(
    heatmap: np.ndarray, options: OutputOptions, base_image: np.ndarray | None = None
) -> list[HeatmapPayload]:
    """A map already at the output size -> its payloads in request order.

    `base_image` (RGB at the map's size) is needed only for `overlay`.
    """
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is 2-D, got shape {heatmap.shape}")
    payloads = _Payloads(heatmap, options, base_image)
    return [payloads.build(fmt) for fmt in options.formats]


def heatmap_payload(
    heatmap: np.ndarray, fmt: HeatmapFormat, base_image: np.ndarray | None = None, **options: object
) -> HeatmapPayload:
    """One payload; `options` are further `OutputOptions` fields (normalize, colormap, ...)."""
    chosen = OutputOptions.model_validate({**options, "format": fmt})
    return heatmap_payloads(heatmap, chosen, base_image)[0]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class _Payloads:
    """Builds payloads of one map, sharing the normalised and 8-bit colored maps between them."""

    def __init__(
        self, heatmap: np.ndarray, options: OutputOptions, base_image: np.ndarray | None
    ) -> None:
        self.options = options
        self.base_image = base_image
        self.normalized = render.normalize(heatmap, options.normalize, options.percentile)
        self.shape = (int(heatmap.shape[0]), int(heatmap.shape[1]))
        self.builders: dict[HeatmapFormat, Callable[[], HeatmapPayload]] = {
            "png": self._png,
            "png16": self._png16,
            "colormap": self._colormap,
            "overlay": self._overlay,
            "array": self._array,
            "json": self._json,
        }

    def build(self, fmt: HeatmapFormat) -> HeatmapPayload:
        return self.builders[fmt]()

    @property
    def _image_normalize(self) -> ImageNormalization:
        # The options validator keeps `none` away from PNG formats.
        assert self.options.normalize != "none"
        return self.options.normalize

    @cached_property
    def _gray8(self) -> np.ndarray:
        return render.to_gray8(self.normalized.values)

    @cached_property
    def _colored(self) -> np.ndarray:
        return render.colorize(self._gray8, self.options.colormap)

    def _png(self) -> HeatmapPayload:
        return PngHeatmap(
            data=_b64(render.encode_png(self._gray8)),
            normalize=self._image_normalize,
            source_range=self.normalized.source_range,
        )

    def _png16(self) -> HeatmapPayload:
        return Png16Heatmap(
            data=_b64(render.encode_png(render.to_gray16(self.normalized.values))),
            normalize=self._image_normalize,
            source_range=self.normalized.source_range,
        )

    def _colormap(self) -> HeatmapPayload:
        return ColormapHeatmap(
            colormap=self.options.colormap,
            data=_b64(render.encode_png(self._colored)),
            normalize=self._image_normalize,
            source_range=self.normalized.source_range,
        )

    def _overlay(self) -> HeatmapPayload:
        if self.base_image is None:
            raise ValueError("an overlay needs the image")
        blended = render.overlay(self._colored, self.base_image, self.options.alpha)
        return OverlayHeatmap(
            colormap=self.options.colormap,
            alpha=self.options.alpha,
            data=_b64(render.encode_png(blended)),
            normalize=self._image_normalize,
            source_range=self.normalized.source_range,
        )

    def _array(self) -> HeatmapPayload:
        data = render.encode_floats(self.normalized.values, self.options.dtype)
        return ArrayHeatmap(
            dtype=self.options.dtype,
            shape=self.shape,
            normalize=self.options.normalize,
            source_range=self.normalized.source_range,
            data=_b64(data),
        )

    def _json(self) -> HeatmapPayload:
        _check_json_size(*self.shape)
        values: list[list[float]] = self.normalized.values.astype(np.float32).tolist()
        return JsonHeatmap(
            shape=self.shape,
            normalize=self.options.normalize,
            source_range=self.normalized.source_range,
            values=values,
        )
