"""Maps at model resolution -> placed, resized, normalised -> PNG bytes or float buffers.

Pure numpy/OpenCV: colormaps and blending are OpenCV's own, pixels come out in OpenCV's BGR
order, which `cv2.imencode` writes as RGB.
"""

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from engines.errors import InvalidParameters
from engines.imaging.decode import Region, fit_to_input, input_region, resize_image
from schemas.explain import OutputOptions
from schemas.heatmap import PNG16_MAX, ColormapName, FloatDtype, HeatmapFormat, Normalization
from schemas.model_config import InputSpec

OutputSize = Literal["input", "model"] | tuple[int, int]

COLORMAPS: dict[ColormapName, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    if heatmap.shape == (height, width):
        return heatmap.astype(np.float32, copy=False)
    resized: np.ndarray = cv2.resize(
        heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    return resized


def to_image_geometry(heatmap: np.ndarray, region: Region, height: int, width: int) -> np.ndarray:
    """A map over the model's input, placed where that input lies in the original image.

    With a centre crop the map covers only the crop; outside it the map is 0 (no evidence).
    """
    canvas = np.zeros((height, width), dtype=np.float32)
    top, left = round(region.top), round(region.left)
    bottom = min(height, round(region.top + region.height))
    right = min(width, round(region.left + region.width))
    if bottom <= top or right <= left:
        return canvas
    canvas[top:bottom, left:right] = resize_map(heatmap, bottom - top, right - left)
    return canvas


@dataclass(frozen=True)
class OutputGeometry:
    """The output map's size and where the model's input lies in it, in output pixels."""

    height: int
    width: int
    region: Region


def output_geometry(
    image_height: int, image_width: int, spec: InputSpec, size: OutputSize
) -> OutputGeometry:
    if size == "model":
        return OutputGeometry(spec.height, spec.width, Region(0.0, 0.0, spec.height, spec.width))
    region = input_region(image_height, image_width, spec)
    if size == "input":
        return OutputGeometry(image_height, image_width, region)
    height, width = size
    sy, sx = height / image_height, width / image_width
    scaled = Region(region.top * sy, region.left * sx, region.height * sy, region.width * sx)
    return OutputGeometry(height, width, scaled)


def place_map(heatmap: np.ndarray, geometry: OutputGeometry) -> np.ndarray:
    return to_image_geometry(heatmap, geometry.region, geometry.height, geometry.width)


def base_image(image: np.ndarray, spec: InputSpec, size: OutputSize) -> np.ndarray:
    """The RGB image under an overlay: the upload at the output size, or as the model saw it."""
    if size == "model":
        return fit_to_input(image, spec)
    if size == "input":
        return image
    return resize_image(image, *size)


@dataclass(frozen=True)
class Normalized:
    values: np.ndarray
    """float32; in [0, 1] unless the normalisation was `none`."""
    source_range: tuple[float, float] | None
    """The raw values that became 0 and 1; None for `none` or a non-finite map."""


def normalize(heatmap: np.ndarray, method: Normalization, percentile: float = 99.0) -> Normalized:
    values = heatmap.astype(np.float32, copy=False)
    if method == "none":
        return Normalized(values, None)
    if method == "signed":
        bound = float(np.abs(values).max())
        return _scale(values, -bound, bound, fill=0.5)
    low = float(values.min())
    high = float(values.max())
    if method == "percentile":
        high = float(np.percentile(values, percentile))
    return _scale(values, low, high, fill=0.0)


def minmax(heatmap: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant map becomes all zeros rather than dividing by zero."""
    return normalize(heatmap, "minmax").values


def _scale(values: np.ndarray, low: float, high: float, fill: float) -> Normalized:
    """Map [low, high] linearly onto [0, 1], clipping outside it.

    An empty range has no scale: values above it are 1, the rest `fill` (a constant map is
    all 0, an all-zero map in `signed` all 0.5). A non-finite range gives all `fill`.
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return Normalized(np.full(values.shape, fill, dtype=np.float32), None)
    if high <= low:
        flat = np.where(values > high, np.float32(1.0), np.float32(fill)).astype(np.float32)
        return Normalized(flat, (low, high))
    scaled = (values - np.float32(low)) / np.float32(high - low)
    return Normalized(np.clip(scaled, 0.0, 1.0).astype(np.float32), (low, high))


def to_gray8(unit: np.ndarray) -> np.ndarray:
    return _quantize(unit, 255, np.uint8)


def to_gray16(unit: np.ndarray) -> np.ndarray:
    return _quantize(unit, PNG16_MAX, np.uint16)


def _quantize(unit: np.ndarray, top: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    pixels: np.ndarray = np.round(np.clip(unit, 0.0, 1.0) * float(top)).astype(dtype)
    return pixels


def colorize(gray8: np.ndarray, colormap: ColormapName) -> np.ndarray:
    """An 8-bit map -> BGR uint8 through an OpenCV colormap; `gray` replicates the map."""
    if colormap == "gray":
        replicated: np.ndarray = cv2.cvtColor(gray8, cv2.COLOR_GRAY2BGR)
        return replicated
    colored: np.ndarray = cv2.applyColorMap(gray8, COLORMAPS[colormap])
    return colored


def overlay(colored_bgr: np.ndarray, image_rgb: np.ndarray, alpha: float) -> np.ndarray:
    """alpha x the colored map + (1 - alpha) x the image, BGR uint8."""
    if image_rgb.shape[:2] != colored_bgr.shape[:2]:
        raise ValueError(f"image {image_rgb.shape[:2]} and map {colored_bgr.shape[:2]} differ")
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    blended: np.ndarray = cv2.addWeighted(colored_bgr, alpha, image_bgr, 1.0 - alpha, 0.0)
    return blended


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8/uint16 gray (H, W) or BGR (H, W, 3) -> PNG bytes."""
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return bytes(encoded)


def encode_floats(values: np.ndarray, dtype: FloatDtype = "float32") -> bytes:
    """Row-major little-endian floats; raw values beyond float16's range are refused, not inf."""
    if dtype == "float16":
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > FLOAT16_MAX:
            raise InvalidParameters(
                f"output: the map reaches {peak:.6g}, beyond float16's {FLOAT16_MAX:g}; "
                "use dtype `float32` or a normalisation"
            )
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


# --- one call: maps -> every requested format --------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One map in one output format: PNG or float bytes (`data`), or the values (`json`)."""

    format: HeatmapFormat
    source_range: tuple[float, float] | None
    shape: tuple[int, int]
    data: bytes | None = None
    values: np.ndarray | None = None


def render_maps(
    maps: list[np.ndarray], image: np.ndarray, spec: InputSpec, options: OutputOptions
) -> list[list[Encoded]]:
    """Maps at model resolution -> each placed at the output size, in every requested format.

    `image` is the decoded upload (RGB), read for the geometry and for `overlay`."""
    geometry = output_geometry(image.shape[0], image.shape[1], spec, options.size)
    base = base_image(image, spec, options.size) if "overlay" in options.formats else None
    return [encode_map(place_map(m, geometry), options, base) for m in maps]


def encode_map(
    heatmap: np.ndarray, options: OutputOptions, base_image: np.ndarray | None = None
) -> list[Encoded]:
    """A map already at the output size -> its formats, in request order; the normalised,
    8-bit and colored maps are made once for all of them. `base_image` (RGB at the map's
    size) is read only by `overlay`."""
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is 2-D, got shape {heatmap.shape}")
    normalized = normalize(heatmap, options.normalize, options.percentile)
    shape = (int(heatmap.shape[0]), int(heatmap.shape[1]))
    made: dict[str, np.ndarray] = {}

    def gray8() -> np.ndarray:
        if "gray8" not in made:
            made["gray8"] = to_gray8(normalized.values)
        return made["gray8"]

    def colored() -> np.ndarray:
        if "colored" not in made:
            made["colored"] = colorize(gray8(), options.colormap)
        return made["colored"]

    def one(fmt: HeatmapFormat) -> Encoded:
        found = normalized.source_range
        if fmt == "png":
            return Encoded(fmt, found, shape, data=encode_png(gray8()))
        if fmt == "png16":
            return Encoded(fmt, found, shape, data=encode_png(to_gray16(normalized.values)))
        if fmt == "colormap":
            return Encoded(fmt, found, shape, data=encode_png(colored()))
        if fmt == "overlay":
            if base_image is None:
                raise ValueError("an overlay needs the image")
            blended = overlay(colored(), base_image, options.alpha)
            return Encoded(fmt, found, shape, data=encode_png(blended))
        if fmt == "array":
            return Encoded(fmt, found, shape, data=encode_floats(normalized.values, options.dtype))
        return Encoded(fmt, found, shape, values=normalized.values.astype(np.float32))

    return [one(fmt) for fmt in options.formats]
