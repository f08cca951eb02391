"""The classifier head a model ends in: global average pooling, then a linear layer.

The original CAM (engines.methods.classic_cam) needs it, and GET /v1/models/{name} says
whether a model has one (engines.models.support).
"""

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from engines.errors import UnsupportedModel
from engines.graphs.context import node_attribute
from engines.graphs.shapes import with_shapes

PASS_THROUGH = {"Flatten", "Reshape", "Squeeze", "Identity"}


@dataclass(frozen=True)
class CamHead:
    feature: str
    """The 4-D tensor that is globally average-pooled."""
    channel_axis: int
    """1 (NCHW feature map) or 3 (NHWC)."""
    weights: np.ndarray
    """(classes, channels): the linear layer's weight, as W @ pooled."""


def _reduce_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    axes = node_attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        found = constants.get(node.input[1])
        axes = None if found is None else found.tolist()
    if axes is None or not isinstance(axes, list):
        return None
    return sorted(int(a) % 4 for a in axes)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    graph = with_shapes(model).graph  # best effort: without shapes the rank check is skipped
    ranks: dict[str, int] = {}
    for value_info in [*graph.value_info, *graph.input, *graph.output]:
        tensor_type = value_info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[value_info.name] = len(tensor_type.shape.dim)
    return ranks


def find_cam_head(model: onnx.ModelProto, output: str) -> CamHead:
    """The GAP + linear head producing `output`, or UnsupportedModel saying what is missing."""
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = node_attribute(node, "value", None)
            if isinstance(value, onnx.TensorProto):
                constants[node.output[0]] = numpy_helper.to_array(value)
    producers = {name: node for node in graph.node for name in node.output}

    def producer(name: str) -> onnx.NodeProto | None:
        return producers.get(name)

    head = producer(output)
    while head is not None and head.op_type in PASS_THROUGH:
        head = producer(head.input[0])
    if head is None:
        raise UnsupportedModel("CAM needs a linear output layer; the output is a graph input")
    weights: np.ndarray
    if head.op_type == "Gemm":
        if int(node_attribute(head, "transA", 0)) != 0:
            raise UnsupportedModel("CAM: the output Gemm transposes its input (transA)")
        b = constants.get(head.input[1])
        if b is None or b.ndim != 2:
            raise UnsupportedModel("CAM: the output Gemm's weight is not a constant matrix")
        trans_b = int(node_attribute(head, "transB", 0))
        alpha = float(node_attribute(head, "alpha", 1.0))
        weights = alpha * (b if trans_b else b.T)
        pooled = head.input[0]
    else:
        matmul = head
        if head.op_type == "Add":
            matmul = next(
                (
                    found
                    for name in head.input
                    if (found := producer(name)) is not None and found.op_type == "MatMul"
                ),
                head,
            )
        if matmul.op_type != "MatMul":
            raise UnsupportedModel(
                f"CAM needs the output to come from Gemm or MatMul+Add, not {head.op_type}"
            )
        b = constants.get(matmul.input[1])
        if b is None or b.ndim != 2:
            raise UnsupportedModel("CAM: the output MatMul's weight is not a constant matrix")
        weights = b.T
        pooled = matmul.input[0]
    pool = producer(pooled)
    while pool is not None and pool.op_type in PASS_THROUGH:
        pool = producer(pool.input[0])
    if pool is None or pool.op_type not in {"GlobalAveragePool", "ReduceMean"}:
        seen = "a graph input" if pool is None else pool.op_type
        raise UnsupportedModel(
            f"CAM needs global average pooling before the linear output layer, found {seen}"
        )
    channel_axis = 1
    if pool.op_type == "ReduceMean":
        axes = _reduce_axes(pool, constants)
        if axes == [2, 3]:
            channel_axis = 1
        elif axes == [1, 2]:
            channel_axis = 3
        else:
            raise UnsupportedModel("CAM: the ReduceMean before the output is not over space")
    feature = pool.input[0]
    rank = _ranks(model).get(feature)
    if rank is not None and rank != 4:
        raise UnsupportedModel(f"CAM needs a 4-D feature map before the pooling, not {rank}-D")
    return CamHead(feature, channel_axis, np.asarray(weights, dtype=np.float64))
