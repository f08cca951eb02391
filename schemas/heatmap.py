"""The heatmap payloads every explanation method returns, one model per output format."""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

# OpenCV refuses to decode an image with a side above 2**20, so every decodable image's map fits.
MAX_HEATMAP_SIDE = 1 << 20
MAX_JSON_VALUES = 65_536
PNG16_MAX: Literal[65535] = 65535

HeatmapFormat = Literal["png", "png16", "colormap", "overlay", "array", "json"]
PNG_FORMATS: frozenset[HeatmapFormat] = frozenset({"png", "png16", "colormap", "overlay"})
Normalization = Literal["minmax", "percentile", "signed", "none"]
ImageNormalization = Literal["minmax", "percentile", "signed"]
ColormapName = Literal["jet", "turbo", "viridis", "inferno", "gray"]
FloatDtype = Literal["float32", "float16"]

Side = Annotated[int, Field(ge=1, le=MAX_HEATMAP_SIDE)]
Shape = Annotated[tuple[Side, Side], Field(description="[height, width]")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Base64 = Annotated[str, Field(min_length=1, description="Base64 bytes.")]

NORMALIZE_DESCRIPTION = (
    "How raw values became the payload's values: `minmax` (min -> 0, max -> 1), `percentile` "
    "(values above the percentile clipped, then min-max), `signed` (v / max|v| mapped to "
    "[0, 1], so 0 -> 0.5) or `none` (the engine's raw values)."
)
SOURCE_RANGE_DESCRIPTION = (
    "The raw values that became 0 and the format's top value (1, 255 or 65535), linearly in "
    "between; null with `normalize: none` or a non-finite map."
)


class _Normalized(BaseModel):
    # Declared here so that every payload serialises `format` first; each subclass narrows it.
    format: HeatmapFormat
    source_range: tuple[FiniteFloat, FiniteFloat] | None = Field(
        default=None, description=SOURCE_RANGE_DESCRIPTION
    )


class _ImagePayload(_Normalized):
    normalize: ImageNormalization = Field(default="minmax", description=NORMALIZE_DESCRIPTION)
    data: Base64


class PngHeatmap(_ImagePayload):
    """An 8-bit grayscale PNG: the normalised map times 255, rounded."""

    format: Literal["png"] = "png"


class Png16Heatmap(_ImagePayload):
    """A 16-bit grayscale PNG: the normalised map times 65535, rounded (lossless to 1/65535)."""

    format: Literal["png16"] = "png16"
    max_value: Literal[65535] = Field(
        default=PNG16_MAX, description="The pixel value a normalised 1.0 became."
    )


class ColormapHeatmap(_ImagePayload):
    """An RGB PNG: the 8-bit map through an OpenCV colormap (`gray` replicates the map)."""

    format: Literal["colormap"] = "colormap"
    colormap: ColormapName


class OverlayHeatmap(_ImagePayload):
    """An RGB PNG: `alpha` x the colormapped map + (1 - alpha) x the image at the map's size."""

    format: Literal["overlay"] = "overlay"
    colormap: ColormapName
    alpha: float = Field(ge=0.0, le=1.0, description="Opacity of the colored map.")


class ArrayHeatmap(_Normalized):
    """The map's values, row-major, little-endian."""

    format: Literal["array"] = "array"
    dtype: FloatDtype = "float32"
    shape: Shape
    normalize: Normalization = Field(default="none", description=NORMALIZE_DESCRIPTION)
    data: Base64 = Field(description="Base64 of the little-endian float buffer.")


class JsonHeatmap(_Normalized):
    """The map's float32 values as nested JSON lists, rows first (small maps only)."""

    format: Literal["json"] = "json"
    shape: Shape
    normalize: Normalization = Field(description=NORMALIZE_DESCRIPTION)
    values: list[Annotated[list[float], Field(max_length=MAX_JSON_VALUES)]] = Field(
        max_length=MAX_JSON_VALUES
    )


HeatmapPayload = (
    PngHeatmap | Png16Heatmap | ColormapHeatmap | OverlayHeatmap | ArrayHeatmap | JsonHeatmap
)
Heatmap = Annotated[HeatmapPayload, Field(discriminator="format")]
