from typing import Literal

from pydantic import BaseModel, Field

from schemas.model_config import InputSpec

ModelStateName = Literal["loading", "ready", "failed"]


class ModelSummary(BaseModel):
    name: str
    state: ModelStateName
    ready: bool
    reason: str | None = Field(default=None, description="Why the model is not ready.")


class ModelList(BaseModel):
    models: list[ModelSummary]


class Layer(BaseModel):
    name: str
    op_type: str
    shape: list[int | str]


class ModelInfo(ModelSummary):
    description: str = ""
    sha256: str | None = None
    provider: str | None = Field(
        default=None, description="The onnxruntime execution provider actually in use."
    )
    input: InputSpec | None = None
    output: Literal["logits", "probabilities"] | None = None
    labels_count: int = 0
    layers: list[Layer] = Field(
        default_factory=list,
        description="4-D spatial activations usable for Grad-CAM and activation maps.",
    )
    default_layer: str | None = None


class Readiness(BaseModel):
    status: Literal["ok", "loading", "unavailable", "draining"]
    models: dict[str, ModelStateName] = Field(default_factory=dict)
