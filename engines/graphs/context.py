"""What a backward rule works with: a node emitter, the forward graph's shapes and constants.

Shapes come from onnx.shape_inference. The leading (batch) axis of every tensor on the
differentiated path is left alone: forward tensors have batch N, gradients have batch M, and the
rules only ever broadcast one against the other on that axis.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.errors import UnsupportedModel

Array = npt.NDArray[Any]
Dim = int | str | None  # a size, a symbolic size (dim_param) or unknown
Dims = tuple[Dim, ...]
Grads = list[str | None]

PREFIX = "grad/"
INT64_MAX = int(np.iinfo(np.int64).max)
FLT_MAX = float(np.finfo(np.float32).max)
DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def node_attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of a node's attribute, or `default` when it is not set."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def pad_extents(
    pads: Sequence[int], axes: Sequence[int] | None, rank: int
) -> tuple[list[int], list[int]] | None:
    """A Pad's (begin, end) on every axis of a rank-`rank` tensor, from its pads and its
    optional `axes` (negative ones count from the end); None when the two do not match."""
    chosen = [int(a) % rank for a in axes] if axes is not None else list(range(rank))
    if len(pads) != 2 * len(chosen) or len(set(chosen)) != len(chosen):
        return None
    begin, end = [0] * rank, [0] * rank
    for index, axis in enumerate(chosen):
        begin[axis], end[axis] = int(pads[index]), int(pads[index + len(chosen)])
    return begin, end


def walk(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node, including those of subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                yield from walk(sub)


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node's subgraphs (If/Loop bodies) read, outer-scope ones among them."""
    return {
        name
        for attribute in node.attribute
        for sub in [attribute.g, *attribute.graphs]
        for inner in walk(sub)
        for name in inner.input
    }


class Emitter:
    """Appends the backward graph's nodes and constants under names no forward tensor uses."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def fresh(self, hint: str) -> str:
        base = PREFIX + hint
        name, count = base, 0
        while name in self.taken:
            count += 1
            name = f"{base}_{count}"
        self.taken.add(name)
        return name

    def ops(
        self, op_type: str, inputs: Sequence[str], hint: str, outputs: int, **attrs: Any
    ) -> list[str]:
        names = [self.fresh(f"{hint}/{op_type}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names

    def op(self, op_type: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        return self.ops(op_type, inputs, hint, 1, **attrs)[0]

    def const(self, value: Array, hint: str = "const") -> str:
        """An initializer holding `value`; equal constants are stored once."""
        value = np.array(value, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        key = (value.dtype.str, value.shape, value.tobytes())
        name = self._constants.get(key)
        if name is None:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(value, name))
            self._constants[key] = name
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(values, dtype=np.int64), "ints")

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32), "scalar")


@dataclass
class GraphInfo:
    """Static facts about the forward graph: inferred shapes, element types, constant values."""

    shapes: dict[str, Dims]
    elem_types: dict[str, int]
    initializers: dict[str, onnx.TensorProto]
    constant_nodes: dict[str, onnx.TensorProto]
    opset: int
    _arrays: dict[str, Array] = field(default_factory=dict)

    def constant(self, name: str) -> Array | None:
        """The value of an initializer or Constant-node output, else None."""
        if name in self._arrays:
            return self._arrays[name]
        proto = self.initializers.get(name) or self.constant_nodes.get(name)
        if proto is None:
            return None
        array = numpy_helper.to_array(proto)
        self._arrays[name] = array
        return array

    def add_constant(self, name: str, value: Array) -> None:
        """Make a constant added to the graph readable like the model's own initializers."""
        self._arrays[name] = value
        self.shapes[name] = tuple(value.shape)
        self.elem_types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)

    def is_float(self, name: str) -> bool:
        return self.elem_types.get(name, TensorProto.FLOAT) in FLOAT_TYPES


@dataclass
class NodeGrad:
    """One node being differentiated: its output gradients and which inputs want one."""

    node: onnx.NodeProto
    grads: Grads
    needs: list[bool]
    emit: Emitter
    info: GraphInfo
    guided: bool

    @property
    def label(self) -> str:
        return self.node.name or (self.node.output[0] if self.node.output else "")

    @property
    def hint(self) -> str:
        return self.label or self.node.op_type

    @property
    def grad(self) -> str:
        """The gradient of the first output (every rule's main input)."""
        grad = self.grads[0]
        assert grad is not None, "rules only run when an output has a gradient"
        return grad

    def fail(self, reason: str = "") -> UnsupportedModel:
        message = f"cannot differentiate {self.node.op_type} node {self.label!r}"
        return UnsupportedModel(f"{message}: {reason}" if reason else message)

    def attr(self, name: str, default: Any) -> Any:
        return node_attribute(self.node, name, default)

    def input(self, index: int) -> str:
        """The name of input `index`, or "" when it is absent or left empty."""
        return self.node.input[index] if index < len(self.node.input) else ""

    def only_first_input(self) -> None:
        """Raise if an input other than the first (data) one depends on the input."""
        if any(self.needs[1:]):
            raise self.fail("only its first input may depend on the model input")

    def dims(self, name: str) -> Dims:
        dims = self.info.shapes.get(name)
        if dims is None:
            raise self.fail(f"the shape of {name!r} is unknown")
        return dims

    def static_dims(self, name: str) -> tuple[int, ...]:
        """All dims after the batch axis, which must be static; the batch axis is returned as -1."""
        dims = self.dims(name)
        if not dims:
            raise self.fail(f"{name!r} has no batch axis")
        rest = [d for d in dims[1:] if isinstance(d, int)]
        if len(rest) != len(dims) - 1:
            raise self.fail(f"the shape of {name!r} is not static")
        return (-1, *rest)

    def rank(self, name: str) -> int:
        return len(self.dims(name))

    def axis(self, axis: int, rank: int) -> int:
        """A normalised axis, which must not be the batch axis."""
        normal = axis + rank if axis < 0 else axis
        if normal == 0:
            raise self.fail("it acts on the batch axis")
        return normal

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        return self.emit.op(op_type, inputs, self.hint, **attrs)


def zero_grads(ctx: NodeGrad) -> Grads:
    return [None] * len(ctx.node.input)


def first_input_grad(ctx: NodeGrad, grad: str) -> Grads:
    grads = zero_grads(ctx)
    grads[0] = grad
    return grads


def same_batch(ctx: NodeGrad, a: str, b: str) -> bool:
    """Whether two forward tensors provably share their batch axis (same size or dim_param)."""
    first, second = ctx.dims(a)[:1], ctx.dims(b)[:1]
    return bool(first) and first == second and first[0] is not None


def reshape_like(ctx: NodeGrad, grad: str, like: str, *, keep_batch: bool = False) -> str:
    """`grad` reshaped to [batch, *like.shape[1:]], the batch being grad's own, never N.

    With `keep_batch` (grad's axis 0 is the batch) the shape says 0, "copy grad's size", which
    keeps the batch's symbolic name in onnxruntime's shape inference; -1 would lose it, and with
    it the blocked (NCHWc) layout of every op downstream.
    """
    dims = ctx.static_dims(like)
    return ctx.op("Reshape", [grad, ctx.emit.ints([0 if keep_batch else -1, *dims[1:]])])


def unbroadcast(ctx: NodeGrad, grad: str, grad_dims: Dims, operand: str) -> str:
    """Sum `grad` over the axes along which `operand` was broadcast (never axis 0)."""
    target = ctx.dims(operand)
    if len(target) != len(grad_dims):
        raise ctx.fail(f"{operand!r} depends on the input but has a different rank")
    axes = [
        i
        for i in range(1, len(target))
        if target[i] == 1 and grad_dims[i] != 1  # unknown output dims are summed: harmless
    ]
    if not axes:
        return grad
    return ctx.op("ReduceSum", [grad, ctx.emit.ints(axes)], keepdims=1)


RELU_LIKE = frozenset({"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSwish"})


def relu_like(node: onnx.NodeProto, info: GraphInfo) -> bool:
    """Whether guided backprop filters at this node: a ReLU-like activation.

    A Clip with a positive lower bound and no upper one only keeps a value off zero (the norm
    in F.normalize, clamp_min(eps)); it is not an activation, and torch's guided backprop
    leaves it alone.
    """
    if node.op_type not in RELU_LIKE:
        return False
    if node.op_type != "Clip":
        return True
    low = info.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    has_high = len(node.input) > 2 and bool(node.input[2])
    return has_high or low is None or low.size != 1 or float(low.reshape(-1)[0]) <= 0.0


def guided_filter(ctx: NodeGrad, grad: str) -> str:
    """The guided-backprop filter at a ReLU-like node: negative gradients do not pass."""
    return ctx.op("Relu", [grad]) if ctx.guided and relu_like(ctx.node, ctx.info) else grad
