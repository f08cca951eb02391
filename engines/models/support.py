"""Which explanation methods a loaded model supports, and why not, found once at load.

One gradient graph (the input and the default layer, guided) is built in memory and never run:
an op without a rule, a subgraph on the path or a missing ReLU-like op shows up there, and
names the op and the node. Methods then need a few capabilities each.
"""

from dataclasses import dataclass
from typing import Literal

from engines.errors import EngineError, NoReluLikeOp
from engines.graphs import GradientSpec, build_gradient_model
from engines.graphs.heads import find_cam_head
from engines.models.loaded import LoadedModel

Capability = Literal["layer", "input_gradient", "layer_gradient", "guided", "cam_head"]

CAM: tuple[Capability, ...] = ("layer", "layer_gradient")
INPUT: tuple[Capability, ...] = ("input_gradient",)
METHOD_NEEDS: dict[str, tuple[Capability, ...]] = {
    "occlusion": (),
    "gradcam": CAM,
    "gradcam++": CAM,
    "xgradcam": CAM,
    "layercam": CAM,
    "hirescam": CAM,
    "scorecam": ("layer",),
    "ablationcam": ("layer",),
    "eigencam": ("layer",),
    "eigengradcam": CAM,
    "guided_gradcam": (*CAM, "guided"),
    "saliency": INPUT,
    "guided_backprop": (*INPUT, "guided"),
    "smoothgrad": INPUT,
    "integrated_gradients": INPUT,
    "gradient_x_input": INPUT,
    "gradientshap": INPUT,
    "deeplift": INPUT,
    "cam": ("cam_head",),
    # Gradient-free: only forward runs, so every model that loads supports them.
    "rise": (),
    "lime": (),
    "kernelshap": (),
}


@dataclass(frozen=True)
class MethodSupport:
    method: str
    supported: bool
    reason: str | None = None


def find_support(model: LoadedModel) -> list[MethodSupport]:
    reasons = _capabilities(model)
    table = []
    for method, needs in METHOD_NEEDS.items():
        reason = next((reasons[n] for n in needs if reasons[n] is not None), None)
        table.append(MethodSupport(method, reason is None, reason))
    return table


def _capabilities(model: LoadedModel) -> dict[Capability, str | None]:
    reasons: dict[Capability, str | None] = {
        "layer": None if model.default_layer else "the model has no 4-D spatial feature map",
        "input_gradient": None,
        "layer_gradient": None,
        "guided": None,
        "cam_head": None,
    }
    try:
        find_cam_head(model.graph, model.output_name)
    except EngineError as exc:
        reasons["cam_head"] = exc.message
    spec = GradientSpec(model.output_name, layer=model.default_layer, wrt_input=True, guided=True)
    try:
        build_gradient_model(model.graph, spec)
        return reasons
    except NoReluLikeOp as exc:
        reasons["guided"] = exc.message
    except EngineError as exc:
        reasons["input_gradient"] = reasons["layer_gradient"] = reasons["guided"] = exc.message
        return reasons
    try:
        plain = GradientSpec(model.output_name, layer=model.default_layer, wrt_input=True)
        build_gradient_model(model.graph, plain)
    except EngineError as exc:
        reasons["input_gradient"] = reasons["layer_gradient"] = exc.message
    return reasons
