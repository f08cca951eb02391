"""An ONNX prefix that makes occluded copies inside the graph, for devices such as CUDA.

The wrapped model takes the clean image and the baseline once (bound on the device) and, per
batch, only the windows' top-left corners; the copies never cross the host-device boundary.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.graphs.normalize import opset_of

PREFIX = "occlusion/"
IMAGE = PREFIX + "image"
BASELINE = PREFIX + "baseline"
TOPS = PREFIX + "tops"
LEFTS = PREFIX + "lefts"
WINDOW = PREFIX + "window"
LAYER_MEANS = PREFIX + "layer_means"


def build_occlusion_model(
    model: onnx.ModelProto,
    input_name: str,
    output_name: str,
    layout: str,
    height: int,
    width: int,
    layer: str | None = None,
    layer_spatial_axes: tuple[int, int] = (2, 3),
) -> onnx.ModelProto:
    """The model with `input_name` computed from IMAGE, BASELINE, TOPS, LEFTS and WINDOW.

    Outputs: `output_name` for every copy, and with `layer` also LAYER_MEANS, the layer's
    per-channel means (B, C) over `layer_spatial_axes` (its own layout's, not the input's).
    """
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    graph = wrapped.graph
    template = next(i for i in graph.input if i.name == input_name)
    channel_axis = 1 if layout == "NCHW" else 3
    dims = [d.dim_value or d.dim_param for d in template.type.tensor_type.shape.dim]
    one_image = [1, *dims[1:]]
    kept = [i for i in graph.input if i.name != input_name]
    del graph.input[:]
    graph.input.extend(
        [
            *kept,
            helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, one_image),
            helper.make_tensor_value_info(BASELINE, TensorProto.FLOAT, one_image),
            helper.make_tensor_value_info(TOPS, TensorProto.INT64, ["windows"]),
            helper.make_tensor_value_info(LEFTS, TensorProto.INT64, ["windows"]),
            helper.make_tensor_value_info(WINDOW, TensorProto.INT64, [1]),
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(
                np.arange(height, dtype=np.int64).reshape(1, -1, 1), PREFIX + "rows"
            ),
            numpy_helper.from_array(
                np.arange(width, dtype=np.int64).reshape(1, 1, -1), PREFIX + "cols"
            ),
            numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), PREFIX + "corner_shape"),
            numpy_helper.from_array(np.array([channel_axis], dtype=np.int64), PREFIX + "channel"),
        ]
    )

    def node(op: str, inputs: list[str], name: str) -> str:
        graph.node.append(helper.make_node(op, inputs, [PREFIX + name]))
        return PREFIX + name

    prefix_start = len(graph.node)
    tops = node("Reshape", [TOPS, PREFIX + "corner_shape"], "tops3")
    lefts = node("Reshape", [LEFTS, PREFIX + "corner_shape"], "lefts3")
    bottoms = node("Add", [tops, WINDOW], "bottoms3")
    rights = node("Add", [lefts, WINDOW], "rights3")
    in_rows = node(
        "And",
        [
            node("GreaterOrEqual", [PREFIX + "rows", tops], "below_top"),
            node("Less", [PREFIX + "rows", bottoms], "above_bottom"),
        ],
        "in_rows",
    )
    in_cols = node(
        "And",
        [
            node("GreaterOrEqual", [PREFIX + "cols", lefts], "right_of_left"),
            node("Less", [PREFIX + "cols", rights], "left_of_right"),
        ],
        "in_cols",
    )
    masks = node("And", [in_rows, in_cols], "masks")
    masks4 = node("Unsqueeze", [masks, PREFIX + "channel"], "masks4")
    graph.node.append(helper.make_node("Where", [masks4, BASELINE, IMAGE], [input_name]))
    # The prefix must run first: move the nodes just appended to the front.
    prefix = list(graph.node[prefix_start:])
    body = list(graph.node[:prefix_start])
    del graph.node[:]
    graph.node.extend([*prefix, *body])

    if layer is not None:
        spatial = list(layer_spatial_axes)
        if opset_of(wrapped) >= 18:
            axes = numpy_helper.from_array(np.array(spatial, dtype=np.int64), PREFIX + "axes")
            graph.initializer.append(axes)
            graph.node.append(
                helper.make_node("ReduceMean", [layer, axes.name], [LAYER_MEANS], keepdims=0)
            )
        else:
            graph.node.append(
                helper.make_node("ReduceMean", [layer], [LAYER_MEANS], axes=spatial, keepdims=0)
            )
        graph.output.append(helper.make_tensor_value_info(LAYER_MEANS, TensorProto.FLOAT, None))
    kept_outputs = [o for o in graph.output if o.name in (output_name, LAYER_MEANS)]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    return wrapped
