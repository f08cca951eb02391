"""Backward rules of elementwise ops, reductions and activations beyond those in derivatives.

Local derivatives are computed from forward tensors (batch N) and only then multiplied into the
gradient (batch M), which broadcasts them along axis 0.
"""

import math
from collections.abc import Callable, Collection

import numpy as np
import onnx
from onnx import TensorProto

from engines.graphs import masks
from engines.graphs.context import (
    DEFAULT_DOMAINS,
    FLOAT_TYPES,
    Grads,
    NodeGrad,
    first_input_grad,
    guided_filter,
    subgraph_reads,
    unbroadcast,
    zero_grads,
)

Rule = Callable[[NodeGrad], Grads]


def _times(ctx: NodeGrad, local: str) -> Grads:
    """The gradient of a unary op whose derivative is `local`."""
    ctx.only_first_input()
    return first_input_grad(ctx, ctx.op("Mul", [ctx.grad, local]))


def _float32(ctx: NodeGrad, name: str) -> str:
    if ctx.info.elem_types.get(name, TensorProto.FLOAT) == TensorProto.FLOAT:
        return name
    return ctx.op("Cast", [name], to=TensorProto.FLOAT)


def _piecewise(ctx: NodeGrad, x: str, positive: str, negative: str) -> str:
    """`positive` where x > 0, else `negative`: negative + [x > 0] * (positive - negative)."""
    step = masks.above(ctx, x, 0.0)
    jump = ctx.op("Mul", [step, ctx.op("Sub", [positive, negative])])
    return ctx.op("Add", [jump, negative])


# --- smooth unary ops ------------------------------------------------------------------------


def tanh(ctx: NodeGrad) -> Grads:
    y = ctx.node.output[0]
    return _times(ctx, masks.affine(ctx, ctx.op("Mul", [y, y]), -1.0, 1.0))


def exp(ctx: NodeGrad) -> Grads:
    return _times(ctx, ctx.node.output[0])


def log(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    return first_input_grad(ctx, ctx.op("Div", [ctx.grad, ctx.node.input[0]]))


def sqrt(ctx: NodeGrad) -> Grads:
    return _times(ctx, ctx.op("Div", [ctx.emit.scalar(0.5), ctx.node.output[0]]))


def reciprocal(ctx: NodeGrad) -> Grads:
    y = ctx.node.output[0]
    return _times(ctx, ctx.op("Neg", [ctx.op("Mul", [y, y])]))


def neg(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    return first_input_grad(ctx, ctx.op("Neg", [ctx.grad]))


def abs_(ctx: NodeGrad) -> Grads:
    """The slope is sign(x), Clip(huge * x, -1, 1) (0 at x = 0, like Sign)."""
    return _times(ctx, masks.ramp(ctx, ctx.node.input[0], masks.SLOPE, 0.0, -1.0, 1.0))


def erf(ctx: NodeGrad) -> Grads:
    x = ctx.node.input[0]
    bell = ctx.op("Exp", [ctx.op("Neg", [ctx.op("Mul", [x, x])])])
    return _times(ctx, ctx.op("Mul", [bell, ctx.emit.scalar(2.0 / math.sqrt(math.pi))]))


def gelu(ctx: NodeGrad) -> Grads:
    """none: Phi(x) + x phi(x). tanh: y = x (1 + t) / 2 with t = tanh(u),
    u = sqrt(2 / pi) (x + 0.044715 x^3), so y' = (1 + t) / 2 + x (1 - t^2) u' / 2."""
    x = ctx.node.input[0]
    emit = ctx.emit
    square = ctx.op("Mul", [x, x])
    approximate = ctx.attr("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate == "none":
        cdf = ctx.op("Erf", [ctx.op("Mul", [x, emit.scalar(1.0 / math.sqrt(2.0))])])
        cdf = masks.affine(ctx, cdf, 0.5, 0.5)
        pdf = ctx.op("Exp", [ctx.op("Mul", [square, emit.scalar(-0.5)])])
        pdf = ctx.op("Mul", [pdf, emit.scalar(1.0 / math.sqrt(2.0 * math.pi))])
        return _times(ctx, ctx.op("Add", [cdf, ctx.op("Mul", [x, pdf])]))
    if approximate != "tanh":
        raise ctx.fail(f"unknown approximation {approximate!r}")
    root, cubic = math.sqrt(2.0 / math.pi), 0.044715
    inner = masks.affine(ctx, square, root * cubic, root)  # u / x
    t = ctx.op("Tanh", [ctx.op("Mul", [x, inner])])
    du = masks.affine(ctx, square, 3.0 * root * cubic, root)
    sech2 = masks.affine(ctx, ctx.op("Mul", [t, t]), -0.5, 0.5)  # (1 - t^2) / 2
    slope = ctx.op("Mul", [ctx.op("Mul", [x, sech2]), du])
    return _times(ctx, ctx.op("Add", [masks.affine(ctx, t, 0.5, 0.5), slope]))


def softplus(ctx: NodeGrad) -> Grads:
    return _times(ctx, ctx.op("Sigmoid", [ctx.node.input[0]]))


def softsign(ctx: NodeGrad) -> Grads:
    """y = x / (1 + |x|), y' = 1 / (1 + |x|)^2 = (1 - |y|)^2."""
    rest = masks.affine(ctx, ctx.op("Abs", [ctx.node.output[0]]), -1.0, 1.0)
    return _times(ctx, ctx.op("Mul", [rest, rest]))


def mish(ctx: NodeGrad) -> Grads:
    """y = x t, t = tanh(softplus(x)): y' = t + x (1 - t^2) sigmoid(x)."""
    x = ctx.node.input[0]
    t = ctx.op("Tanh", [ctx.op("Softplus", [x])])
    sech2 = masks.affine(ctx, ctx.op("Mul", [t, t]), -1.0, 1.0)
    slope = ctx.op("Mul", [ctx.op("Mul", [x, sech2]), ctx.op("Sigmoid", [x])])
    return _times(ctx, ctx.op("Add", [t, slope]))


def log_softmax(ctx: NodeGrad) -> Grads:
    """y = x - logsumexp(x): dx = g - softmax(x) * sum(g) along the axis."""
    ctx.only_first_input()
    y = ctx.node.output[0]
    axis = ctx.axis(int(ctx.attr("axis", -1)), ctx.rank(y))
    total = ctx.op("ReduceSum", [ctx.grad, ctx.emit.ints([axis])], keepdims=1)
    spread = ctx.op("Mul", [ctx.op("Exp", [y]), total])
    return first_input_grad(ctx, ctx.op("Sub", [ctx.grad, spread]))


def swish_muls(
    graph: onnx.GraphProto, active: Collection[str], kept: Collection[str]
) -> dict[str, int]:
    """SiLU as exporters write it, Mul(x, Sigmoid(x)), where nothing else reads the sigmoid:
    each such Mul's output -> the index of its input x (see `swish`)."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in {*node.input, *subgraph_reads(node)}:
            readers[name] = readers.get(name, 0) + 1
    sigmoids = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Sigmoid" and n.domain in DEFAULT_DOMAINS and n.output[0] not in kept
    }
    found = {}
    for node in graph.node:
        if node.op_type != "Mul" or node.domain not in DEFAULT_DOMAINS or len(node.input) != 2:
            continue
        for index, (x, gate) in enumerate((node.input, node.input[::-1])):
            if sigmoids.get(gate) == x and readers[gate] == 1 and node.output[0] in active:
                found[node.output[0]] = index
    return found


def swish(ctx: NodeGrad, x_index: int) -> Grads:
    """y = x s with s = sigmoid(x), through both factors: y' = s + x s (1 - s) = s (1 + x - y).

    Three passes over the map (1 - y + x, times s, times the gradient) where the Mul's and the
    Sigmoid's own rules take six and a sum; the Sigmoid node is then left out of the backward.
    """
    x, gate, y = ctx.node.input[x_index], ctx.node.input[1 - x_index], ctx.node.output[0]
    rest = ctx.op("Add", [masks.affine(ctx, y, -1.0, 1.0), x])
    grads = zero_grads(ctx)
    grads[x_index] = ctx.op("Mul", [ctx.grad, ctx.op("Mul", [gate, rest])])
    return grads


# --- ReLU-like activations: the guided filter applies --------------------------------------


def _guided_times(ctx: NodeGrad, slope: str) -> Grads:
    ctx.only_first_input()
    return first_input_grad(ctx, ctx.op("Mul", [guided_filter(ctx, ctx.grad), slope]))


def elu(ctx: NodeGrad) -> Grads:
    """Slope 1 for x > 0, else alpha e^x = y + alpha."""
    alpha = float(ctx.attr("alpha", 1.0))
    x, y = ctx.node.input[0], ctx.node.output[0]
    negative = masks.affine(ctx, y, 1.0, alpha)
    return _guided_times(ctx, _piecewise(ctx, x, ctx.emit.scalar(1.0), negative))


def selu(ctx: NodeGrad) -> Grads:
    """Slope gamma for x > 0, else gamma alpha e^x = y + gamma alpha."""
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    x, y = ctx.node.input[0], ctx.node.output[0]
    negative = masks.affine(ctx, y, 1.0, gamma * alpha)
    return _guided_times(ctx, _piecewise(ctx, x, ctx.emit.scalar(gamma), negative))


def celu(ctx: NodeGrad) -> Grads:
    """Slope 1 for x > 0, else e^(x / alpha) = y / alpha + 1."""
    alpha = float(ctx.attr("alpha", 1.0))
    x, y = ctx.node.input[0], ctx.node.output[0]
    negative = masks.affine(ctx, y, 1.0 / alpha, 1.0)
    return _guided_times(ctx, _piecewise(ctx, x, ctx.emit.scalar(1.0), negative))


def prelu(ctx: NodeGrad) -> Grads:
    """dx: slope 1 for x > 0, else the slope input. dslope: min(x, 0), unbroadcast.

    The guided filter applies to the gradient passed on to x only.
    """
    x, slope = ctx.node.input[0], ctx.node.input[1]
    grads = zero_grads(ctx)
    if ctx.needs[0]:
        local = _piecewise(ctx, x, ctx.emit.scalar(1.0), slope)
        grads[0] = ctx.op("Mul", [guided_filter(ctx, ctx.grad), local])
    if ctx.needs[1]:
        below = ctx.op("Min", [x, ctx.emit.scalar(0.0)])
        grad = ctx.op("Mul", [ctx.grad, below])
        grads[1] = unbroadcast(ctx, grad, ctx.dims(ctx.node.output[0]), slope)
    return grads


# --- broadcasting arithmetic -----------------------------------------------------------------


def _each_input(ctx: NodeGrad, make: Callable[[int], str]) -> Grads:
    """Each wanted input's gradient `make(index)`, summed back to that input's shape."""
    out_dims = ctx.dims(ctx.node.output[0])
    grads = zero_grads(ctx)
    for index, need in enumerate(ctx.needs):
        if need:
            grads[index] = unbroadcast(ctx, make(index), out_dims, ctx.node.input[index])
    return grads


def sum_(ctx: NodeGrad) -> Grads:
    return _each_input(ctx, lambda _: ctx.grad)


def mean(ctx: NodeGrad) -> Grads:
    scaled = ctx.op("Mul", [ctx.grad, ctx.emit.scalar(1.0 / len(ctx.node.input))])
    return _each_input(ctx, lambda _: scaled)


def extremum(ctx: NodeGrad) -> Grads:
    """Max, Min: the gradient goes where an input equals the output, split evenly among ties.

    (A tie of two is where central differences also give each input half.)
    """
    y = ctx.node.output[0]
    hits = [ctx.op("Cast", [ctx.op("Equal", [x, y])], to=TensorProto.FLOAT) for x in ctx.node.input]
    if len(hits) == 1:
        return _each_input(ctx, lambda _: ctx.grad)
    share = ctx.op("Div", [ctx.grad, ctx.op("Sum", hits)])
    return _each_input(ctx, lambda index: ctx.op("Mul", [share, hits[index]]))


def pow_(ctx: NodeGrad) -> Grads:
    """y = a^b: da = b a^(b - 1), db = y ln(a)."""
    a, b, y = ctx.node.input[0], ctx.node.input[1], ctx.node.output[0]
    emit = ctx.emit
    constant = ctx.info.constant(b)

    def base() -> str:
        if constant is not None:
            exponent = constant.astype(np.float32)
            power = ctx.op("Pow", [a, emit.const(exponent - np.float32(1.0), "exponent")])
            local = ctx.op("Mul", [power, emit.const(exponent, "exponent")])
        else:
            exponent_name = _float32(ctx, b)
            less = ctx.op("Sub", [exponent_name, emit.scalar(1.0)])
            local = ctx.op("Mul", [ctx.op("Pow", [a, less]), exponent_name])
        return ctx.op("Mul", [ctx.grad, local])

    def exponent() -> str:
        return ctx.op("Mul", [ctx.grad, ctx.op("Mul", [y, ctx.op("Log", [a])])])

    return _each_input(ctx, lambda index: base() if index == 0 else exponent())


def where(ctx: NodeGrad) -> Grads:
    """The gradient goes to X where the condition holds, to Y elsewhere."""
    condition = ctx.node.input[0]  # a bool tensor: never on the differentiated path
    zero = ctx.emit.scalar(0.0)

    def pick(index: int) -> str:
        chosen = [ctx.grad, zero] if index == 1 else [zero, ctx.grad]
        return ctx.op("Where", [condition, *chosen])

    return _each_input(ctx, pick)


def cast(ctx: NodeGrad) -> Grads:
    """Float-to-float casts only; the gradient is cast back to the input's type."""
    ctx.only_first_input()
    x = ctx.node.input[0]
    source = ctx.info.elem_types.get(x, TensorProto.FLOAT)
    target = int(ctx.attr("to", TensorProto.FLOAT))
    if source not in FLOAT_TYPES or target not in FLOAT_TYPES:
        raise ctx.fail("only casts between float types are differentiated")
    if source == target:
        return first_input_grad(ctx, ctx.grad)
    return first_input_grad(ctx, ctx.op("Cast", [ctx.grad], to=source))


# --- reductions ------------------------------------------------------------------------------


def _reduced_axes(ctx: NodeGrad) -> list[int]:
    """The reduced axes, sorted and non-negative: [] when the node reduces nothing.

    Axes come from the attribute (opsets < 18; ReduceSum < 13) or from input 1, which must
    be a constant. No axes means all of them, the batch axis among them: refused.
    """
    ctx.only_first_input()
    rank = ctx.rank(ctx.node.input[0])
    axes = ctx.attr("axes", None)
    if axes is None and ctx.input(1):
        value = ctx.info.constant(ctx.input(1))
        if value is None:
            raise ctx.fail("its axes are not a constant")
        axes = value.reshape(-1).tolist()
    if not axes:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            return []
        raise ctx.fail("it reduces over every axis, the batch axis among them")
    normal = sorted({int(a) + rank if int(a) < 0 else int(a) for a in axes})
    if 0 in normal:
        raise ctx.fail("it reduces over the batch axis")
    return normal


def _kept(ctx: NodeGrad, name: str, axes: list[int]) -> str:
    """A reduction's output (or its gradient) with the reduced axes back as size-1 axes."""
    if not axes or int(ctx.attr("keepdims", 1)):
        return name
    return ctx.op("Unsqueeze", [name, ctx.emit.ints(axes)])


def _spread(ctx: NodeGrad, grad: str) -> str:
    """`grad`, with size-1 reduced axes, broadcast to [M, *x.shape[1:]]."""
    dims = ctx.static_dims(ctx.node.input[0])
    return ctx.op("Expand", [grad, ctx.emit.ints([1, *dims[1:]])])


def reduce_sum(ctx: NodeGrad) -> Grads:
    axes = _reduced_axes(ctx)
    if not axes:
        return first_input_grad(ctx, ctx.grad)
    return first_input_grad(ctx, _spread(ctx, _kept(ctx, ctx.grad, axes)))


def reduce_mean(ctx: NodeGrad) -> Grads:
    axes = _reduced_axes(ctx)
    if not axes:
        return first_input_grad(ctx, ctx.grad)
    dims = ctx.static_dims(ctx.node.input[0])
    scale = ctx.emit.scalar(1.0 / math.prod(dims[a] for a in axes))
    scaled = ctx.op("Mul", [_kept(ctx, ctx.grad, axes), scale])
    return first_input_grad(ctx, _spread(ctx, scaled))


def reduce_sum_square(ctx: NodeGrad) -> Grads:
    axes = _reduced_axes(ctx)
    twice = ctx.op("Mul", [ctx.node.input[0], ctx.emit.scalar(2.0)])
    return first_input_grad(ctx, ctx.op("Mul", [_kept(ctx, ctx.grad, axes), twice]))


def reduce_l2(ctx: NodeGrad) -> Grads:
    """y = sqrt(sum x^2): dx = g x / y."""
    axes = _reduced_axes(ctx)
    x, y = ctx.node.input[0], ctx.node.output[0]
    local = ctx.op("Div", [x, _kept(ctx, y, axes)])
    return first_input_grad(ctx, ctx.op("Mul", [_kept(ctx, ctx.grad, axes), local]))


def _to_extremum(ctx: NodeGrad, y: str, axes: list[int]) -> Grads:
    """The gradient goes to where x equals the reduced extremum, split evenly among ties."""
    hits = ctx.op("Cast", [ctx.op("Equal", [ctx.node.input[0], y])], to=TensorProto.FLOAT)
    count = ctx.op("ReduceSum", [hits, ctx.emit.ints(axes)], keepdims=1)
    share = ctx.op("Div", [hits, count])
    return first_input_grad(ctx, ctx.op("Mul", [_kept(ctx, ctx.grad, axes), share]))


def reduce_extremum(ctx: NodeGrad) -> Grads:
    """ReduceMax, ReduceMin: see _to_extremum."""
    axes = _reduced_axes(ctx)
    if not axes:
        return first_input_grad(ctx, ctx.grad)
    return _to_extremum(ctx, _kept(ctx, ctx.node.output[0], axes), axes)


def global_max_pool(ctx: NodeGrad) -> Grads:
    """See _to_extremum; the pool keeps its reduced (spatial) axes."""
    ctx.only_first_input()
    rank = ctx.rank(ctx.node.input[0])
    return _to_extremum(ctx, ctx.node.output[0], list(range(2, rank)))


RULES: dict[str, Rule] = {
    "Tanh": tanh,
    "Exp": exp,
    "Log": log,
    "Sqrt": sqrt,
    "Reciprocal": reciprocal,
    "Neg": neg,
    "Abs": abs_,
    "Erf": erf,
    "Gelu": gelu,
    "Softplus": softplus,
    "Softsign": softsign,
    "Mish": mish,
    "LogSoftmax": log_softmax,
    "Elu": elu,
    "Selu": selu,
    "Celu": celu,
    "PRelu": prelu,
    "Sum": sum_,
    "Mean": mean,
    "Max": extremum,
    "Min": extremum,
    "Pow": pow_,
    "Where": where,
    "Cast": cast,
    "ReduceSum": reduce_sum,
    "ReduceMean": reduce_mean,
    "ReduceSumSquare": reduce_sum_square,
    "ReduceL2": reduce_l2,
    "ReduceMax": reduce_extremum,
    "ReduceMin": reduce_extremum,
    "GlobalMaxPool": global_max_pool,
}
