"""Model insight views: the layer summary, a Conv layer's filters, and feature maps."""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

MAX_FILTERS_PAGE = 256
MAX_ACTIVATION_LAYERS = 8
MAX_CHANNELS = 64
MAX_NAME = 1024

Dim = Annotated[int, Field(ge=0)] | Annotated[str, Field(max_length=256)]
Count = Annotated[int, Field(ge=0)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Base64 = Annotated[str, Field(min_length=1, description="Base64 bytes.")]

FilterFormat = Literal["png", "array"]
ActivationFormat = Literal["grid", "array"]


class SummaryRow(BaseModel):
    name: str = Field(max_length=MAX_NAME, description="The node's name (its output if unnamed).")
    op_type: str = Field(max_length=256)
    output: str = Field(max_length=MAX_NAME, description="The node's first output tensor.")
    output_shape: list[Dim] | None = Field(
        default=None,
        max_length=64,
        description="Shape of the first output, inferred at the configured input size, batch 1.",
    )
    params: Count = Field(description="Sizes of the initializers it consumes (first use only).")


class ModelSummaryTable(BaseModel):
    """The layer table `model.summary()` prints, one row per ONNX node."""

    model: str = Field(max_length=64)
    input_shape: list[Dim] = Field(max_length=64)
    rows: list[SummaryRow] = Field(max_length=1_000_000)
    total_params: Count
    nodes: Count


class FloatArray(BaseModel):
    """Row-major little-endian float32 values."""

    dtype: Literal["float32"] = "float32"
    shape: list[Count] = Field(max_length=8)
    data: Base64


class PngGrid(BaseModel):
    """A PNG of tiles laid out row by row, `rows` x `cols`, each `tile` = [height, width]
    pixels, 1 pixel apart."""

    data: Base64
    rows: Count
    cols: Count
    tile: tuple[Count, Count]
    tiles: Count = Field(description="Tiles drawn.")
    color: Literal["rgb", "gray"]


class FiltersResponse(BaseModel):
    model: str = Field(max_length=64)
    layer: str = Field(max_length=MAX_NAME, description="The Conv node's name.")
    output: str = Field(max_length=MAX_NAME, description="The Conv node's output tensor.")
    kernel_shape: list[Count] = Field(
        max_length=8, description="The whole weight's shape: [filters, in/group, kh, kw]."
    )
    total: Count = Field(description="Filters in the layer.")
    offset: Count
    limit: Count
    count: Count = Field(description="Filters in this page.")
    channels_shown: Count = Field(
        description="Input channels drawn per filter in a grayscale grid (capped)."
    )
    grid: PngGrid | None = None
    weights: FloatArray | None = Field(default=None, description="The page's weights.")
    bias: FloatArray | None = Field(default=None, description="The page's biases, if any.")


class ActivationsRequest(BaseModel):
    image: str = Field(min_length=1, description="Base64 PNG/JPEG/WebP (JSON requests).")
    layers: list[Name] = Field(min_length=1, max_length=MAX_ACTIVATION_LAYERS)
    channels: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        max_length=MAX_CHANNELS,
        description="Channel indices to return; default: the first 64.",
    )
    format: ActivationFormat = "grid"
    timeout_ms: int | None = Field(default=None, ge=1, le=600_000)


class LayerActivations(BaseModel):
    layer: str = Field(max_length=MAX_NAME)
    shape: list[Count] = Field(max_length=8, description="The activations' full shape.")
    channels_total: Count
    channels: list[Count] = Field(max_length=MAX_CHANNELS, description="Channels returned.")
    grid: PngGrid | None = None
    array: FloatArray | None = Field(
        default=None, description="Chosen channels, shape [channels, height, width]."
    )


class ActivationsResponse(BaseModel):
    model: str = Field(max_length=64)
    layers: list[LayerActivations] = Field(max_length=MAX_ACTIVATION_LAYERS)
