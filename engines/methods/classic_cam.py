"""The original class activation map (Zhou et al. 2016) for models ending in GAP + linear.

When the output is `W @ mean_hw(A) + b`, class c's map is `sum_k W[c, k] * A_k`: no gradients
are needed. The head is found in the ONNX graph: a Gemm (or MatMul + Add) with a constant weight,
fed through Flatten/Reshape/Squeeze/Identity only by GlobalAveragePool (or ReduceMean over the
spatial axes) of a 4-D tensor.
"""

import threading
from typing import ClassVar

import numpy as np

from engines.errors import UnsupportedModel
from engines.graphs.heads import CamHead, find_cam_head
from engines.methods.cam import channels_first, rectified_map
from engines.methods.pipeline import Explained, Explainer, TargetMap, WorkLimits, clean_targets
from engines.models.loaded import LoadedModel
from schemas.params import ClassicCamParams

_heads: dict[str, CamHead | UnsupportedModel] = {}
_heads_lock = threading.Lock()


def cam_head(model: LoadedModel) -> CamHead:
    """The model's CAM head, found once per model file."""
    with _heads_lock:
        found = _heads.get(model.graph_sha256)
        if found is None:
            try:
                found = find_cam_head(model.graph, model.output_name)
            except UnsupportedModel as exc:
                found = exc
            _heads[model.graph_sha256] = found
    if isinstance(found, UnsupportedModel):
        raise UnsupportedModel(found.message)
    return found


class ClassicCam(Explainer):
    params_model: ClassVar[type[ClassicCamParams]] = ClassicCamParams

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: ClassicCamParams,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        head = cam_head(model)
        listed = next((layer for layer in model.layers if layer.name == head.feature), None)
        if listed is not None and listed.channel_axis != head.channel_axis:
            raise UnsupportedModel(
                f"CAM: the pooling before the output does not average {head.feature!r} over its "
                f"spatial axes (it is {listed.layout})"
            )
        probabilities, targets = clean_targets(model, tensor, targets, top_k)
        activations = model.layer_activations(tensor, head.feature)
        features = channels_first(activations, head.channel_axis)[0].astype(np.float64)
        if features.shape[0] != head.weights.shape[1]:
            raise UnsupportedModel(
                f"CAM: the linear layer takes {head.weights.shape[1]} inputs but the pooled "
                f"feature map has {features.shape[0]} channels"
            )
        maps = [
            TargetMap(int(t), rectified_map(model, np.tensordot(head.weights[t], features, axes=1)))
            for t in targets
        ]
        return Explained(probabilities, maps)
