"""Which activations of an ONNX graph are usable as Grad-CAM / activation-map layers."""

from dataclasses import dataclass

import onnx

from schemas.model_config import InputSpec


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op_type: str
    shape: tuple[int | str, ...]


def shape_of(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return tuple(dims)


def spatial_layers(model: onnx.ModelProto, spec: InputSpec) -> list[LayerInfo]:
    """Node outputs that are 4-D feature maps with a spatial extent above 1x1, in graph order."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort; a model without shapes has no list
        inferred = model
    graph = inferred.graph
    shapes: dict[str, tuple[int | str, ...]] = {}
    for value_info in [*graph.value_info, *graph.output]:
        shape = shape_of(value_info)
        if shape is not None:
            shapes[value_info.name] = shape
    spatial_axes = (2, 3) if spec.layout == "NCHW" else (1, 2)
    layers: list[LayerInfo] = []
    for node in graph.node:
        for output in node.output:
            shape = shapes.get(output)
            if shape is None or len(shape) != 4:
                continue
            extent = [shape[a] for a in spatial_axes]
            if all(isinstance(d, int) and d > 1 for d in extent):
                layers.append(LayerInfo(output, node.op_type, shape))
    return layers
