"""Request and response envelopes of `POST /v1/models/{name}/explain`.

Each method validates its own `params`; the envelope bounds their size.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.heatmap import Heatmap
from schemas.predict import IMAGE_FIELD_DESCRIPTION, MAX_IMAGE_BASE64_CHARS, Prediction

ExplainMethod = Literal[
    "occlusion",
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "guided_gradcam",
    "saliency",
    "guided_backprop",
    "smoothgrad",
    "integrated_gradients",
    "gradient_x_input",
]

MAX_TARGETS = 20

ParamValue = Annotated[
    bool | int | float | Annotated[str, Field(max_length=256)] | None,
    Field(union_mode="left_to_right"),
]
Target = Annotated[
    int | Annotated[str, Field(min_length=1, max_length=256)],
    Field(description="A class index or a label name.", union_mode="left_to_right"),
]


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "array"] = "png"
    size: Literal["input", "model"] = Field(
        default="input",
        description="`input`: the uploaded image's size; `model`: the model's input size.",
    )


class ExplainRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "iVBORw0KGgoAAAANSUhEUgAA...",
                    "method": "gradcam",
                    "top_k": 1,
                    "params": {},
                    "output": {"format": "png"},
                }
            ]
        },
    )

    image: str = Field(
        min_length=1, max_length=MAX_IMAGE_BASE64_CHARS, description=IMAGE_FIELD_DESCRIPTION
    )
    method: ExplainMethod
    targets: list[Target] | None = Field(
        default=None,
        max_length=MAX_TARGETS,
        description="Classes to explain; when absent the `top_k` predicted classes are used.",
    )
    top_k: int = Field(default=1, ge=1, le=MAX_TARGETS)
    params: dict[Annotated[str, Field(max_length=64)], ParamValue | list[float]] = Field(
        default_factory=dict, max_length=32, description="Method-specific parameters."
    )
    output: OutputOptions = Field(default_factory=OutputOptions)


class Explanation(BaseModel):
    target: int = Field(ge=0)
    label: str
    heatmap: Heatmap


class ExplainResponse(BaseModel):
    model: str
    method: ExplainMethod
    predictions: list[Prediction]
    explanations: list[Explanation]
    timings_ms: dict[str, float]
