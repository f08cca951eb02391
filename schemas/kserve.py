"""KServe's V1 protocol: `POST /v1/models/{name}:predict` and `:explain` with `instances`."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from .explain import MAX_TARGETS, ExplainMethod, Explanation, OutputOptions, ParamValue, Target
from .predict import MAX_IMAGE_BASE64_CHARS, TIMEOUT_DESCRIPTION, Prediction

MAX_INSTANCES = 16


class Binary(BaseModel):
    """KServe's convention for binary data in JSON."""

    model_config = ConfigDict(extra="forbid")
    b64: str = Field(max_length=MAX_IMAGE_BASE64_CHARS, description="Base64 PNG, JPEG or WebP.")


class ImageInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: Binary


Instance = ImageInstance | Binary | list[Any]
"""An encoded image, as `{"image": {"b64": ...}}` or `{"b64": ...}`, or a nested list of
floats in the model's own input shape without the batch axis (already preprocessed)."""


class PredictInstances(BaseModel):
    instances: list[Instance] = Field(min_length=1, max_length=MAX_INSTANCES)
    top_k: int = Field(default=5, ge=1, le=100)
    timeout_ms: int | None = Field(default=None, ge=1, le=600_000, description=TIMEOUT_DESCRIPTION)


class ExplainInstances(PredictInstances):
    """The instances and our explain fields beside them."""

    method: ExplainMethod = "gradcam"
    targets: list[Target] | None = Field(default=None, max_length=MAX_TARGETS)
    top_k: int = Field(default=1, ge=1, le=MAX_TARGETS)
    params: dict[Annotated[str, Field(max_length=64)], ParamValue | list[float]] = Field(
        default_factory=dict, max_length=32
    )
    output: OutputOptions = Field(default_factory=OutputOptions)


class PredictAnswer(BaseModel):
    predictions: list[list[Prediction]] = Field(description="The top-k classes, per instance.")


class ExplainAnswer(PredictAnswer):
    explanations: list[list[Explanation]] = Field(description="The maps, per instance.")
