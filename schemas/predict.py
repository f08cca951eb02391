from pydantic import BaseModel, ConfigDict, Field

# 20 MiB of image encoded as base64 is 4/3 as long.
MAX_IMAGE_BASE64_CHARS = 28 * 1024 * 1024
MAX_TOP_K = 100

IMAGE_FIELD_DESCRIPTION = (
    "A PNG, JPEG or WebP image, base64-encoded (a `data:image/...;base64,` prefix is accepted)."
)


TIMEOUT_DESCRIPTION = (
    "Deadline for this request's work in milliseconds; it can only lower the service's own."
)


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"image": "iVBORw0KGgoAAAANSUhEUgAA...", "top_k": 5}]},
    )

    image: str = Field(
        min_length=1, max_length=MAX_IMAGE_BASE64_CHARS, description=IMAGE_FIELD_DESCRIPTION
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    timeout_ms: int | None = Field(
        default=None, ge=1, le=3_600_000, description=TIMEOUT_DESCRIPTION
    )


class Prediction(BaseModel):
    index: int = Field(ge=0)
    label: str
    score: float = Field(description="Probability of the class (softmax of logits if needed).")


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]
    timings_ms: dict[str, float]
