"""Request and response envelopes of `POST /v1/models/{name}/explain`.

Each method validates its own `params`; the envelope bounds their size.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .heatmap import (
    MAX_JSON_VALUES,
    PNG_FORMATS,
    ColormapName,
    FloatDtype,
    Heatmap,
    HeatmapFormat,
    Normalization,
)
from .predict import (
    IMAGE_FIELD_DESCRIPTION,
    MAX_IMAGE_BASE64_CHARS,
    TIMEOUT_DESCRIPTION,
    Prediction,
)

ExplainMethod = Literal[
    "occlusion",
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "hirescam",
    "scorecam",
    "ablationcam",
    "eigencam",
    "eigengradcam",
    "guided_gradcam",
    "saliency",
    "guided_backprop",
    "smoothgrad",
    "integrated_gradients",
    "gradient_x_input",
    "gradientshap",
    "deeplift",
    "cam",
    "rise",
    "lime",
    "kernelshap",
]

MAX_TARGETS = 20
MAX_METRIC_STEPS = 256

MetricName = Literal["deletion", "insertion"]

ParamValue = Annotated[
    bool | int | float | Annotated[str, Field(max_length=256)] | None,
    Field(union_mode="left_to_right"),
]
Target = Annotated[
    int | Annotated[str, Field(min_length=1, max_length=256)],
    Field(description="A class index or a label name.", union_mode="left_to_right"),
]


MAX_FORMATS = 6
MAX_OUTPUT_SIDE = 4096

OutputSide = Annotated[int, Field(ge=1, le=MAX_OUTPUT_SIDE)]
OutputSize = Annotated[
    Literal["input", "model"] | tuple[OutputSide, OutputSide],
    Field(union_mode="left_to_right"),
]
FormatList = Annotated[list[HeatmapFormat], Field(min_length=1, max_length=MAX_FORMATS)]


class OutputOptions(BaseModel):
    """How each map is rendered; every explanation gets one payload per requested format."""

    model_config = ConfigDict(extra="forbid")

    format: HeatmapFormat | FormatList = Field(
        default="png",
        union_mode="left_to_right",
        description="One format or a list of distinct formats: `png` (8-bit gray), `png16` "
        "(16-bit gray), `colormap` (RGB), `overlay` (the colored map on the image), `array` "
        f"(base64 floats), `json` (nested lists, at most {MAX_JSON_VALUES} values a map).",
    )
    size: OutputSize = Field(
        default="input",
        description="`input`: the uploaded image's size; `model`: the model's input size (the "
        "image as the model saw it); `[h, w]`: the uploaded image's geometry at h x w.",
    )
    normalize: Normalization = Field(
        default="minmax",
        description="`minmax`, `percentile` (clip above `percentile`, then min-max), `signed` "
        "(0 -> 0.5) or `none` (raw values; only for `array` and `json`).",
    )
    percentile: float = Field(
        default=99.0, gt=0.0, le=100.0, description="The clipping percentile of `percentile`."
    )
    colormap: ColormapName = Field(default="jet", description="For `colormap` and `overlay`.")
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Opacity of the map in `overlay`."
    )
    dtype: FloatDtype = Field(default="float32", description="For `array`.")

    @field_validator("format")
    @classmethod
    def _distinct(
        cls, value: HeatmapFormat | list[HeatmapFormat]
    ) -> HeatmapFormat | list[HeatmapFormat]:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("formats must be distinct")
        return value

    @model_validator(mode="after")
    def _images_need_a_range(self) -> "OutputOptions":
        images = [fmt for fmt in self.formats if fmt in PNG_FORMATS]
        if self.normalize == "none" and images:
            raise ValueError(
                f"normalize `none` keeps raw values, which {', '.join(images)} cannot hold; "
                "use it with `array` or `json` only"
            )
        return self

    @property
    def formats(self) -> list[HeatmapFormat]:
        return [self.format] if isinstance(self.format, str) else list(self.format)


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
                    "output": {"format": ["overlay", "array"], "normalize": "minmax"},
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
    timeout_ms: int | None = Field(
        default=None, ge=1, le=3_600_000, description=TIMEOUT_DESCRIPTION
    )
    params: dict[Annotated[str, Field(max_length=64)], ParamValue | list[float]] = Field(
        default_factory=dict, max_length=32, description="Method-specific parameters."
    )
    output: OutputOptions = Field(default_factory=OutputOptions)
    metrics: list[MetricName] = Field(
        default_factory=list,
        max_length=2,
        description="Faithfulness scores to add to each explanation: RISE's `deletion` (the "
        "target's probability as the map's top pixels turn grey; lower is better) and "
        "`insertion` (as they return into a blurred copy; higher is better), as AUCs.",
    )
    metric_steps: int = Field(
        default=32, ge=1, le=MAX_METRIC_STEPS, description="Points of each curve, less one."
    )
    curves: bool = Field(default=False, description="Also return the curves behind the AUCs.")
    stream: bool = Field(
        default=False,
        description="Answer as a stream: NDJSON lines (Server-Sent Events with `Accept: "
        'text/event-stream`) of progress `{"done", "total", "stage"}`, then one '
        '`{"result": ...}` with the usual answer, or one `{"error": ...}`.',
    )

    @field_validator("metrics")
    @classmethod
    def _distinct_metrics(cls, value: list[MetricName]) -> list[MetricName]:
        if len(set(value)) != len(value):
            raise ValueError("metrics must be distinct")
        return value


class Faithfulness(BaseModel):
    """RISE's deletion and insertion scores of one map (only those asked for are set)."""

    deletion_auc: float | None = None
    insertion_auc: float | None = None
    deletion_curve: list[float] | None = Field(
        default=None,
        description="The target's probability with k/steps of the ranked pixels deleted, "
        "k = 0..steps (with `curves`).",
    )
    insertion_curve: list[float] | None = Field(
        default=None, description="As `deletion_curve`, for insertion."
    )


class Explanation(BaseModel):
    target: int = Field(ge=0)
    label: str
    heatmap: Heatmap = Field(description="The payload of the first requested format.")
    heatmaps: list[Heatmap] = Field(
        min_length=1,
        max_length=MAX_FORMATS,
        description="The payloads of every requested format, in request order.",
    )
    metrics: Faithfulness | None = Field(
        default=None, description="With `metrics` in the request: how faithful the map is."
    )


class ExplainResponse(BaseModel):
    model: str
    method: ExplainMethod
    predictions: list[Prediction]
    explanations: list[Explanation]
    timings_ms: dict[str, float]
    passes: int | None = Field(
        default=None,
        ge=0,
        description="Occluded copies the model ran (occlusion only; fast mode runs fewer).",
    )
