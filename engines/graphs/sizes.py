"""Byte sizes read off a graph, for the memory budget (engines.runtime.memory)."""

import math

import onnx
from onnx import TensorProto

from engines.graphs.shapes import with_shapes

_ITEM_BYTES: dict[int, int] = {
    TensorProto.FLOAT: 4,
    TensorProto.FLOAT16: 2,
    TensorProto.DOUBLE: 8,
    TensorProto.INT64: 8,
    TensorProto.INT32: 4,
    TensorProto.BOOL: 1,
    TensorProto.UINT8: 1,
    TensorProto.INT8: 1,
}


def _value_bytes(value: onnx.ValueInfoProto, rows: int) -> int:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return 0
    dims = [d.dim_value if d.HasField("dim_value") else rows for d in tensor.shape.dim]
    return math.prod(dims) * _ITEM_BYTES.get(int(tensor.elem_type), 4)


def activation_bytes(model: onnx.ModelProto, rows: int = 1) -> int:
    """Bytes of every tensor the graph computes for `rows` images, a free dim read as `rows`.

    An upper bound of what onnxruntime holds during a run (its planner reuses buffers of
    tensors no longer read); shapes come from the graph's value_info, inferred if it has none.
    """
    graph = with_shapes(model).graph  # best effort: a bound from what is known
    known = {*(v.name for v in graph.value_info)}
    outputs = [o for o in graph.output if o.name not in known]
    return sum(_value_bytes(v, rows) for v in [*graph.value_info, *outputs])
