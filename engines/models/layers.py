"""Which activations of an ONNX graph are usable as Grad-CAM / activation-map layers.

A model's input layout says nothing about its feature maps: Keras and tf2onnx exports take NHWC
images, Transpose them and run ONNX's NCHW convolutions. Each 4-D tensor's layout is followed
through the graph from the input; a tensor whose layout cannot be told is not offered.
"""

from dataclasses import dataclass

import onnx

from engines.graphs.context import DEFAULT_DOMAINS, FLOAT_TYPES, node_attribute
from engines.graphs.shapes import with_shapes
from schemas.model_config import InputSpec, Layout, channel_axis, spatial_axes

# ONNX defines these on NCHW tensors: their (first) output is NCHW whatever fed them.
NCHW_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "BatchNormalization",
        "InstanceNormalization",
        "LRN",
        "Resize",
        "Upsample",
        "MaxUnpool",
        "DepthToSpace",
        "SpaceToDepth",
    }
)
# Output axes line up with the 4-D inputs' axes (broadcasting aside).
ELEMENTWISE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Cast",
        "Ceil",
        "Celu",
        "Clip",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Elu",
        "Erf",
        "Exp",
        "Floor",
        "Gelu",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LeakyRelu",
        "Log",
        "Max",
        "Mean",
        "Min",
        "Mish",
        "Mul",
        "Neg",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "Reciprocal",
        "Relu",
        "Round",
        "Selu",
        "Sigmoid",
        "Sign",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Sub",
        "Sum",
        "Tanh",
        "ThresholdedRelu",
        "Where",
    }
)
# These keep the order of the axes of their first input.
STRUCTURAL_OPS = frozenset({"Concat", "Split", "Pad", "Slice"})
# With keepdims (the default) a reduction keeps every axis where it was.
REDUCE_OPS = frozenset(
    {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL2", "ReduceL1"}
)
TO_NHWC = [0, 2, 3, 1]
TO_NCHW = [0, 3, 1, 2]


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op_type: str
    shape: tuple[int | str, ...]
    layout: Layout

    @property
    def channel_axis(self) -> int:
        return channel_axis(self.layout)

    @property
    def spatial_axes(self) -> tuple[int, int]:
        return spatial_axes(self.layout)


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


def _output_layout(
    node: onnx.NodeProto,
    layouts: dict[str, Layout],
    ranks: dict[str, int],
    constants: set[str],
) -> Layout | None:
    """The layout of a node's 4-D outputs, or None when it cannot be told."""
    op = node.op_type
    if node.domain not in DEFAULT_DOMAINS:
        return None
    if op in NCHW_OPS:
        return "NCHW"
    if not node.input:
        return None
    if op == "Transpose":
        source = layouts.get(node.input[0])
        perm = node_attribute(node, "perm", None)
        perm = list(perm) if isinstance(perm, list) else None
        if perm == [0, 1, 2, 3]:
            return source
        if source == "NCHW" and perm == TO_NHWC:
            return "NHWC"
        if source == "NHWC" and perm == TO_NCHW:
            return "NCHW"
        return None
    if op == "MatMul" and len(node.input) == 2:
        # A channels-last map times a weight matrix: a 1x1 convolution over the last axis.
        weight = node.input[1]
        if layouts.get(node.input[0]) == "NHWC" and weight in constants and ranks.get(weight) == 2:
            return "NHWC"
        return None
    if op in STRUCTURAL_OPS or (op in REDUCE_OPS and node_attribute(node, "keepdims", 1) == 1):
        inputs = list(node.input) if op == "Concat" else [node.input[0]]
    elif op in ELEMENTWISE_OPS:
        inputs = list(node.input)
    else:
        return None
    # Constants broadcast against the data; other tensors of rank other than 4 do too. The
    # output's axes line up with every 4-D input's, so one input of a known layout tells it
    # (a residual sum whose other branch went through a Reshape, as GroupNorm exports do).
    seen = {
        layouts.get(name)
        for name in inputs
        if name and name not in constants and ranks.get(name, 4) == 4
    }
    known = seen - {None}
    if len(known) != 1:
        return None
    (layout,) = known
    return layout


def _keeps_positions(node: onnx.NodeProto, constants: set[str]) -> bool:
    """Whether the output holds each element of input 0 at its position (values may change)."""
    op = node.op_type
    if op in ("Reshape", "InstanceNormalization"):
        return True
    others = [name for name in node.input[1:] if name]
    return op in ELEMENTWISE_OPS and all(name in constants for name in others)


def spatial_layers(model: onnx.ModelProto, spec: InputSpec) -> list[LayerInfo]:
    """Node outputs that are 4-D feature maps of a known layout with a spatial extent above 1x1,
    in graph order."""
    graph = with_shapes(model).graph  # best effort: a model without shapes has no list
    shapes: dict[str, tuple[int | str, ...]] = {}
    integer: set[str] = set()  # a quantized model's int8 maps: no layer to explain or show
    for value_info in [*graph.input, *graph.value_info, *graph.output]:
        shape = shape_of(value_info)
        if shape is not None:
            shapes[value_info.name] = shape
        if value_info.type.tensor_type.elem_type not in (*FLOAT_TYPES, onnx.TensorProto.UNDEFINED):
            integer.add(value_info.name)
    ranks = {name: len(shape) for name, shape in shapes.items()}
    ranks.update({init.name: len(init.dims) for init in graph.initializer})
    constants = {init.name for init in graph.initializer}
    constants.update(init.values.name for init in graph.sparse_initializer)
    feeds = [i.name for i in graph.input if i.name not in constants]
    image = spec.name or (feeds[0] if feeds else None)
    layouts: dict[str, Layout] = {} if image is None else {image: spec.layout}
    layers: list[LayerInfo] = []
    # Tensors of another rank whose elements sit where they sat in a 4-D map of known layout
    # and shape: GroupNorm exports reshape to [N, G, -1], normalise, and reshape back.
    unflattened: dict[str, tuple[Layout, tuple[int | str, ...]]] = {}
    # Tensors computed from a map a Pad enlarged, and that map's extent before it: a padded
    # border or window reaches past the image (window attention pads a 1x1 map to its 4x4
    # window), so until the extent is back within the original it is no layer to explain.
    padded: dict[str, tuple[int | str, ...]] = {}
    # Valid ONNX graphs are topologically sorted: each node's inputs are known before it.
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        layout = _output_layout(node, layouts, ranks, constants)
        source = node.input[0] if node.input else ""
        before_pad = next((padded[name] for name in node.input if name in padded), ())
        if not before_pad and node.op_type == "Pad" and source in layouts:
            before_pad = _extent(shapes.get(source), layouts[source])
        if before_pad:
            for output in node.output:
                reach = _extent(shapes.get(output), layout)
                if output not in integer and _beyond(reach, before_pad):
                    padded[output] = before_pad
        if node.op_type == "Reshape" and source in layouts and source in shapes:
            unflattened[node.output[0]] = (layouts[source], shapes[source])
        elif source in unflattened and _keeps_positions(node, constants):
            origin = unflattened[source]
            if node.op_type == "Reshape" and shapes.get(node.output[0]) == origin[1]:
                layout = layout or origin[0]
            else:
                unflattened[node.output[0]] = origin
        outputs = node.output[:1] if node.op_type in NCHW_OPS else node.output
        for output in outputs:
            shape = shapes.get(output)
            if layout is None or shape is None or len(shape) != 4:
                continue  # only known 4-D tensors carry a layout onwards
            layouts[output] = layout
            info = LayerInfo(output, node.op_type, shape, layout)
            extent = _extent(shape, layout)
            listable = output not in integer and output not in padded
            if all(isinstance(d, int) and d > 1 for d in extent) and listable:
                layers.append(info)
    return layers


def _extent(shape: tuple[int | str, ...] | None, layout: Layout | None) -> tuple[int | str, ...]:
    """A 4-D map's (height, width); () when its shape or layout is not known."""
    if shape is None or layout is None or len(shape) != 4:
        return ()
    return tuple(shape[axis] for axis in spatial_axes(layout))


def _beyond(extent: tuple[int | str, ...], origin: tuple[int | str, ...]) -> bool:
    """Whether a tensor downstream of a Pad still reaches past the map it padded: unknown
    (another rank, as windows reshaped for attention) counts as still padded."""
    if not extent or not origin:
        return True
    pairs = zip(extent, origin, strict=True)
    return any(not isinstance(e, int) or not isinstance(o, int) or e > o for e, o in pairs)


# Ops between a classifying Conv and the global pooling that leave its channels class scores.
_CLASS_MAP_OPS = frozenset({"Relu", "Clip", "Dropout", "Identity", "Softmax", "Sigmoid"})


def default_layer(model: onnx.ModelProto, layers: list[LayerInfo], classes: int) -> str | None:
    """Grad-CAM's layer when none is asked for: the last spatial feature map.

    A network that classifies with a 1x1 Conv into one channel per class before pooling
    (SqueezeNet, network-in-network) has class-score maps there, not features: the feature
    map is what that Conv reads."""
    if not layers:
        return None
    last = layers[-1]
    producers = {output: node for node in model.graph.node for output in node.output}
    constants = {init.name: init for init in model.graph.initializer}
    listed = {layer.name for layer in layers}
    node = producers.get(last.name)
    while node is not None and node.op_type in _CLASS_MAP_OPS and node.input:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Conv" or len(node.input) < 2:
        return last.name
    weight = constants.get(node.input[1])
    classifying = (
        weight is not None
        and len(weight.dims) == 4
        and list(weight.dims[2:]) == [1, 1]
        and weight.dims[0] == classes
        and int(node_attribute(node, "group", 1)) == 1
    )
    return node.input[0] if classifying and node.input[0] in listed else last.name
