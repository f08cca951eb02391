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
    layout: Literal["NCHW", "NHWC"] = Field(
        description="Where this feature map keeps its channels, which can differ from the "
        "input's layout (an NHWC model may run NCHW convolutions inside)."
    )


class MethodSupport(BaseModel):
    method: str
    supported: bool
    reason: str | None = Field(
        default=None, description="Why not: the op and node, or what the model lacks."
    )


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
    batch: Literal["free", "rewritten", "one_row"] | None = Field(
        default=None,
        description="`free`: the model takes any batch; `rewritten`: exported with a batch of "
        "1, made free here and checked against batch-1 runs at load; `one_row`: the batch "
        "stays 1 and batches run one row at a time.",
    )
    methods: list[MethodSupport] = Field(
        default_factory=list, description="Per explanation method: supported, or why not."
    )


class Readiness(BaseModel):
    status: Literal["ok", "loading", "unavailable", "draining"]
    models: dict[str, ModelStateName] = Field(default_factory=dict)
