"""Activation maximization: the knobs of the gradient ascent, and the request and answer."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .predict import TIMEOUT_DESCRIPTION

MAX_STEPS = 500


class MaximizeParams(BaseModel):
    """Gradient ascent on the input tensor of one class score, with the usual regularizers."""

    model_config = ConfigDict(extra="forbid")

    layer: str | None = Field(
        default=None,
        max_length=256,
        description="Maximize the mean activation of channel `target` of this layer (one of "
        "the layers GET /v1/models/{name} lists) instead of a class score.",
    )
    steps: int = Field(default=100, ge=1, le=MAX_STEPS)
    learning_rate: float = Field(
        default=0.05,
        gt=0.0,
        le=100.0,
        description="Step size in input-tensor units; with `normalize_gradient` each step moves "
        "a value by about this much.",
    )
    normalize_gradient: bool = Field(
        default=True, description="Divide each step's gradient by its mean absolute value."
    )
    l2_decay: float = Field(
        default=1e-3,
        ge=0.0,
        le=1.0,
        description="Each step multiplies the tensor by (1 - l2_decay): L2 weight decay.",
    )
    blur_every: int = Field(
        default=4, ge=0, le=MAX_STEPS, description="Gaussian blur every N steps (0: never)."
    )
    blur_sigma: float = Field(default=0.5, ge=0.0, le=10.0, description="Blur sigma in pixels.")
    jitter: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Roll the image by up to this many pixels before each step (undone after).",
    )
    clip: bool = Field(
        default=True,
        description="Keep every value within what pixels 0..255 map to under the model's "
        "scale, mean and std.",
    )
    start: Literal["grey", "noise", "zeros"] = Field(
        default="grey",
        description="Mid-grey pixels, uniform noise pixels around grey, or a zero tensor.",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class MaximizeRequest(MaximizeParams):
    target: int | Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="The class to maximize (an index or a label name), or with `layer` the "
        "channel index of that layer whose mean activation is maximized."
    )
    stream: bool = Field(
        default=False,
        description='Answer NDJSON: `{"step", "score"}` lines, then `{"result": ...}` '
        '(or `{"error": ...}`).',
    )
    array: bool = Field(
        default=False, description="Also return the final input tensor as base64 float32."
    )
    timeout_ms: int | None = Field(
        default=None, ge=1, le=3_600_000, description=TIMEOUT_DESCRIPTION
    )


class TensorArray(BaseModel):
    dtype: Literal["float32"] = "float32"
    shape: list[int]
    data: str = Field(description="Base64 of the little-endian float32 buffer (model layout).")


class MaximizeResponse(BaseModel):
    model: str
    target: int
    label: str
    score: float = Field(description="The target's raw output for the final image.")
    scores: list[float] = Field(description="The target's output at each step, before its update.")
    steps: int
    image: str = Field(description="Base64 PNG of the final image (RGB, model input size).")
    array: TensorArray | None = None
    timings_ms: dict[str, float]
