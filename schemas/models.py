from typing import Literal

from pydantic import BaseModel, Field

from .model_config import InputSpec

ModelStateName = Literal["unloaded", "loading", "loaded", "failed"]


class ModelSummary(BaseModel):
    name: str
    state: ModelStateName = Field(
        description="`unloaded`: not in memory, loads on first use (or was unloaded to make "
        "room); `loading`; `loaded`; `failed`, with the reason."
    )
    ready: bool = Field(description="The model can answer: loaded, or loadable on first use.")
    reason: str | None = Field(
        default=None, description="Why the model failed, or why it is not loaded yet."
    )


class MemoryUse(BaseModel):
    budget_bytes: int = Field(description="The memory budget every cache and batch lives in.")
    used_bytes: int = Field(description="Resident entries plus work in flight (estimated).")
    resident_bytes: dict[str, int] = Field(
        description="Estimated bytes by kind: models, gradient/activation/occlusion/maximize "
        "sessions."
    )
    reserved_bytes: int = Field(description="Held by work in flight (batches, model loads).")
    evictions: dict[str, int] = Field(description="Entries evicted so far, by kind.")
    builds_in_flight: int
    process_resident_bytes: int = Field(description="The process's resident set size now.")


class ModelList(BaseModel):
    models: list[ModelSummary]
    memory: MemoryUse | None = None


class Layer(BaseModel):
    name: str
    op_type: str
    shape: list[int | str]
    layout: Literal["NCHW", "NHWC"] = Field(
        description="Where this feature map keeps its channels, which can differ from the "
        "input's layout (an NHWC model may run NCHW convolutions inside)."
    )


class WarmGraph(BaseModel):
    method: Literal["gradcam", "saliency", "guided_backprop"]
    layer: str | None = None
    warm: bool = Field(description="Built and resident: a request does not wait for it.")


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
    graphs: list[WarmGraph] = Field(
        default_factory=list,
        description="The default layer's gradient graphs, built in the background after load.",
    )


class Readiness(BaseModel):
    status: Literal["ok", "loading", "unavailable", "draining"]
    models: dict[str, ModelStateName] = Field(default_factory=dict)
