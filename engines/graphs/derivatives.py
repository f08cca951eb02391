"""Backward rules, one per op type: each returns the gradient of every input (None: none needed).

A rule sees the gradients of the node's outputs (batch M) and may read the node's forward
tensors (batch N, which is M or 1); it broadcasts the two on axis 0 and never uses N itself.
"""

from collections.abc import Callable

import numpy as np

from engines.graphs import masks, pointwise, spatial, structural
from engines.graphs.context import (
    FLT_MAX,
    INT64_MAX,
    Grads,
    NodeGrad,
    first_input_grad,
    guided_filter,
    pad_extents,
    reshape_like,
    same_batch,
    unbroadcast,
    zero_grads,
)

Rule = Callable[[NodeGrad], Grads]


# --- activations -----------------------------------------------------------------------------


def relu(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    mask = masks.above(ctx, ctx.node.output[0], 0.0)
    return first_input_grad(ctx, ctx.op("Mul", [guided_filter(ctx, ctx.grad), mask]))


def _scalar(ctx: NodeGrad, name: str) -> float | None:
    value = ctx.info.constant(name)
    return None if value is None or value.size != 1 else float(value.reshape(-1)[0])


def clip(ctx: NodeGrad) -> Grads:
    """The slope is 1 where the input was not clipped: low < y < high, read off the output.

    Reading the output (not the input) keeps Conv+Clip fused in onnxruntime.
    """
    ctx.only_first_input()
    y, low, high = ctx.node.output[0], ctx.input(1), ctx.input(2)
    grad = guided_filter(ctx, ctx.grad)
    if not low and not high:
        return first_input_grad(ctx, grad)
    low_value = _scalar(ctx, low) if low else None
    high_value = _scalar(ctx, high) if high else None
    if (low and low_value is None) or (high and high_value is None):
        return first_input_grad(ctx, ctx.op("Mul", [grad, _inside(ctx, y, low, high)]))
    if high_value is not None and high_value > 0 and low_value == -high_value:
        return first_input_grad(ctx, ctx.op("Mul", [grad, masks.inside(ctx, y, high_value)]))
    factors = []
    if low_value is not None:
        factors.append(masks.above(ctx, y, low_value))
    if high_value is not None:
        factors.append(masks.below(ctx, y, high_value))
    return first_input_grad(ctx, ctx.op("Mul", [grad, masks.product(ctx, *factors)]))


def _inside(ctx: NodeGrad, y: str, low: str, high: str) -> str:
    """The mask low < y < high for bounds computed at run time."""
    above = ctx.op("Sub", [y, low]) if low else None
    below = ctx.op("Sub", [high, y]) if high else None
    # Both factors are >= 0, so their product is > 0 exactly when y is strictly inside.
    margin = ctx.op("Mul", [above, below]) if above and below else above or below or y
    return ctx.op("HardSigmoid", [margin], alpha=FLT_MAX, beta=0.0)


def leaky_relu(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    alpha = float(ctx.attr("alpha", 0.01))
    if 0.0 < alpha <= 1.0:
        # y has x's sign; Clip(huge * y, alpha, 1) is 1 for y > 0 and alpha otherwise.
        slope = masks.ramp(ctx, ctx.node.output[0], masks.SLOPE, 0.0, alpha, 1.0)
    else:
        positive = ctx.op("Greater", [ctx.node.input[0], ctx.emit.scalar(0.0)])
        slope = ctx.op("Where", [positive, ctx.emit.scalar(1.0), ctx.emit.scalar(alpha)])
    return first_input_grad(ctx, ctx.op("Mul", [guided_filter(ctx, ctx.grad), slope]))


def sigmoid(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    y = ctx.node.output[0]
    local = ctx.op("Mul", [y, masks.affine(ctx, y, -1.0, 1.0)])
    return first_input_grad(ctx, ctx.op("Mul", [ctx.grad, local]))


def hard_sigmoid(ctx: NodeGrad) -> Grads:
    """Slope alpha where 0 < y < 1 (the linear part), else 0."""
    ctx.only_first_input()
    alpha = float(ctx.attr("alpha", 0.2))
    y = ctx.node.output[0]
    above_zero = masks.above(ctx, y, 0.0)
    if alpha >= 0:
        scaled_below_one = masks.ramp(ctx, y, -masks.SLOPE, masks.SLOPE, 0.0, alpha)
    else:
        scaled_below_one = masks.ramp(ctx, y, masks.SLOPE, -masks.SLOPE, alpha, 0.0)
    local = ctx.op("Mul", [above_zero, scaled_below_one])
    return first_input_grad(ctx, ctx.op("Mul", [ctx.grad, local]))


def hard_swish(ctx: NodeGrad) -> Grads:
    """y = x * clip(x / 6 + 1/2, 0, 1): slope 0 below -3, 1 from 3 on, x / 3 + 1/2 between.

    As masks: clip(x / 3 + 1/2, -1/2, 3/2) * [x > -3] - 1/2 * [x >= 3].
    """
    ctx.only_first_input()
    x = ctx.node.input[0]
    line = masks.ramp(ctx, x, 1.0 / 3.0, 0.5, -0.5, 1.5)
    middle = ctx.op("Mul", [line, masks.above(ctx, x, -3.0)])
    local = ctx.op("Add", [middle, masks.at_least(ctx, x, 3.0, -0.5)])
    return first_input_grad(ctx, ctx.op("Mul", [guided_filter(ctx, ctx.grad), local]))


def softmax(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    y = ctx.node.output[0]
    axis = ctx.axis(int(ctx.attr("axis", -1)), ctx.rank(y))
    weighted = ctx.op("Mul", [ctx.grad, y])
    total = ctx.op("ReduceSum", [weighted, ctx.emit.ints([axis])], keepdims=1)
    return first_input_grad(ctx, ctx.op("Mul", [y, ctx.op("Sub", [ctx.grad, total])]))


def identity(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    return first_input_grad(ctx, ctx.grad)


def dropout(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    training = ctx.info.constant(ctx.input(2)) if ctx.input(2) else None
    if training is not None and bool(training):
        raise ctx.fail("training mode")
    return first_input_grad(ctx, ctx.grad)


# --- broadcasting arithmetic -----------------------------------------------------------------


def _binary(ctx: NodeGrad, grad_a: Callable[[], str], grad_b: Callable[[], str]) -> Grads:
    """Each wanted operand's gradient, summed back to that operand's shape."""
    out_dims = ctx.dims(ctx.node.output[0])
    grads = zero_grads(ctx)
    for index, make in enumerate((grad_a, grad_b)):
        if ctx.needs[index]:
            grads[index] = unbroadcast(ctx, make(), out_dims, ctx.node.input[index])
    return grads


def add(ctx: NodeGrad) -> Grads:
    return _binary(ctx, lambda: ctx.grad, lambda: ctx.grad)


def sub(ctx: NodeGrad) -> Grads:
    return _binary(ctx, lambda: ctx.grad, lambda: ctx.op("Neg", [ctx.grad]))


def mul(ctx: NodeGrad) -> Grads:
    a, b = ctx.node.input[0], ctx.node.input[1]
    return _binary(ctx, lambda: ctx.op("Mul", [ctx.grad, b]), lambda: ctx.op("Mul", [ctx.grad, a]))


def div(ctx: NodeGrad) -> Grads:
    b, y = ctx.node.input[1], ctx.node.output[0]
    scaled: list[str] = []

    def over_b() -> str:  # g / b, shared by both operands
        if not scaled:
            scaled.append(ctx.op("Div", [ctx.grad, b]))
        return scaled[0]

    # d(a / b) / db = -(a / b) / b = -y / b
    return _binary(ctx, over_b, lambda: ctx.op("Neg", [ctx.op("Mul", [over_b(), y])]))


# --- matrix products -------------------------------------------------------------------------


def gemm(ctx: NodeGrad) -> Grads:
    if ctx.needs[1]:
        raise ctx.fail("its B operand depends on the input")
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    grads = zero_grads(ctx)
    if ctx.needs[0]:
        if trans_a:
            raise ctx.fail("transA moves the batch axis")
        b = ctx.node.input[1]
        grads[0] = ctx.op("Gemm", [ctx.grad, b], alpha=alpha, transB=1 - trans_b)
    if len(ctx.needs) > 2 and ctx.needs[2]:
        scaled = ctx.op("Mul", [ctx.grad, ctx.emit.scalar(beta)])
        grads[2] = unbroadcast(ctx, scaled, ctx.dims(ctx.node.output[0]), ctx.node.input[2])
    return grads


# --- shape ops -------------------------------------------------------------------------------


def reshape(ctx: NodeGrad) -> Grads:
    """Flatten, Reshape, Squeeze, Unsqueeze: the gradient takes the input's shape back."""
    ctx.only_first_input()
    x, y = ctx.node.input[0], ctx.node.output[0]
    keep = same_batch(ctx, x, y)
    return first_input_grad(ctx, reshape_like(ctx, ctx.grad, x, keep_batch=keep))


def flatten(ctx: NodeGrad) -> Grads:
    ctx.axis(int(ctx.attr("axis", 1)), ctx.rank(ctx.node.input[0]))
    return reshape(ctx)


def _constant_axes(ctx: NodeGrad, index: int, rank: int) -> list[int] | None:
    """Axes from input `index` (or the attribute of opsets < 13), made non-negative."""
    axes = ctx.attr("axes", None)
    if axes is None and ctx.input(index):
        value = ctx.info.constant(ctx.input(index))
        if value is None:
            raise ctx.fail("its axes are not a constant")
        axes = value.reshape(-1).tolist()
    return None if axes is None else [int(a) + rank if int(a) < 0 else int(a) for a in axes]


def squeeze(ctx: NodeGrad) -> Grads:
    x_dims = ctx.dims(ctx.node.input[0])
    axes = _constant_axes(ctx, 1, len(x_dims))
    if (axes is None and x_dims[0] == 1) or (axes is not None and 0 in axes):
        raise ctx.fail("it squeezes the batch axis")
    return reshape(ctx)


def unsqueeze(ctx: NodeGrad) -> Grads:
    if 0 in (_constant_axes(ctx, 1, ctx.rank(ctx.node.output[0])) or []):
        raise ctx.fail("it moves the batch axis")
    return reshape(ctx)


def transpose(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    rank = ctx.rank(ctx.node.input[0])
    perm = list(ctx.attr("perm", list(reversed(range(rank)))))
    if perm[0] != 0:
        raise ctx.fail("it moves the batch axis")
    inverse = np.argsort(perm).tolist()
    return first_input_grad(ctx, ctx.op("Transpose", [ctx.grad], perm=inverse))


def concat(ctx: NodeGrad) -> Grads:
    rank = ctx.rank(ctx.node.output[0])
    axis = ctx.axis(int(ctx.attr("axis", 0)), rank)
    sizes = [ctx.dims(name)[axis] for name in ctx.node.input]
    static = [size for size in sizes if isinstance(size, int)]
    if len(static) != len(sizes):
        raise ctx.fail("the sizes along its axis are not static")
    parts = ctx.emit.ops(
        "Split", [ctx.grad, ctx.emit.ints(static)], ctx.hint, len(sizes), axis=axis
    )
    return [part if need else None for part, need in zip(parts, ctx.needs, strict=True)]


def pad(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    mode = ctx.attr("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise ctx.fail(f"padding mode {mode!r} is not supported")
    rank = ctx.rank(ctx.node.input[0])
    pads = ctx.info.constant(ctx.input(1))
    if pads is None:
        raise ctx.fail("its pads are not a constant")
    extents = pad_extents(pads.reshape(-1).tolist(), _constant_axes(ctx, 3, rank), rank)
    if extents is None:
        raise ctx.fail("its pads do not match its axes")
    begin, end = extents
    if begin[0] or end[0]:
        raise ctx.fail("it pads the batch axis")
    if mode != "constant":
        return first_input_grad(ctx, _fold_border_back(ctx, mode, begin, end))
    if min(begin + end) >= 0:
        return first_input_grad(ctx, _crop(ctx, begin, end))
    undo = ctx.emit.ints([-p for p in begin + end])  # negative pads crop, positive ones refill
    return first_input_grad(ctx, ctx.op("Pad", [ctx.grad, undo]))


def _fold_border_back(ctx: NodeGrad, mode: str, begin: list[int], end: list[int]) -> str:
    """The gradient of a reflect, edge or wrap Pad: each padded border's gradient goes back to
    the input positions it copies, one axis at a time.

    Along an axis of size n padded by b before and e after: reflect copies input b..1 before
    and n-2..n-1-e after (the border row itself is not repeated), edge copies input 0 and n-1,
    wrap copies n-b..n-1 and 0..e-1.
    """
    if min(begin + end) < 0:
        raise ctx.fail(f"{mode} padding with negative pads is not supported")
    sizes = ctx.static_dims(ctx.node.input[0])
    emit, grad = ctx.emit, ctx.grad

    def part(tensor: str, axis: int, start: int, stop: int, flip: bool = False) -> str:
        if flip:
            starts, ends, steps = [stop - 1], [start - 1 if start else -INT64_MAX], [-1]
        else:
            starts, ends, steps = [start], [stop], [1]
        return ctx.op(
            "Slice",
            [tensor, emit.ints(starts), emit.ints(ends), emit.ints([axis]), emit.ints(steps)],
        )

    def placed(tensor: str, axis: int, before: int, after: int) -> str:
        pads = [0] * (2 * len(sizes))
        pads[axis], pads[axis + len(sizes)] = before, after
        return ctx.op("Pad", [tensor, emit.ints(pads)])

    for axis in range(1, len(sizes)):
        b, e, n = begin[axis], end[axis], sizes[axis]
        if not b and not e:
            continue
        if mode == "reflect" and max(b, e) > n - 1:
            raise ctx.fail("its reflect pads are wider than the input")
        if mode == "wrap" and max(b, e) > n:
            raise ctx.fail("its wrap pads are wider than the input")
        terms = [part(grad, axis, b, b + n)]
        for width, offset, at_start in ((b, 0, True), (e, b + n, False)):
            if not width:
                continue
            border = part(grad, axis, offset, offset + width, flip=mode == "reflect")
            # Where along the input the border's gradient lands, and how many positions.
            if mode == "edge":
                border = ctx.op("ReduceSum", [border, emit.ints([axis])])
                at, length = (0 if at_start else n - 1), 1
            elif mode == "reflect":
                at, length = (1 if at_start else n - 1 - width), width
            else:
                at, length = (n - width if at_start else 0), width
            terms.append(placed(border, axis, at, n - at - length))
        grad = terms[0] if len(terms) == 1 else ctx.op("Sum", terms)
    return grad


def _crop(ctx: NodeGrad, begin: list[int], end: list[int]) -> str:
    axes = [a for a in range(len(begin)) if begin[a] or end[a]]
    if not axes:
        return ctx.grad
    starts = [begin[a] for a in axes]
    ends = [-end[a] if end[a] else INT64_MAX for a in axes]
    emit = ctx.emit
    return ctx.op("Slice", [ctx.grad, emit.ints(starts), emit.ints(ends), emit.ints(axes)])


RULES: dict[str, Rule] = {
    "Relu": relu,
    "Clip": clip,
    "LeakyRelu": leaky_relu,
    "Sigmoid": sigmoid,
    "HardSigmoid": hard_sigmoid,
    "HardSwish": hard_swish,
    "Softmax": softmax,
    "Identity": identity,
    "Dropout": dropout,
    "Add": add,
    "Sub": sub,
    "Mul": mul,
    "Div": div,
    "Gemm": gemm,
    "Flatten": flatten,
    "Reshape": reshape,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Transpose": transpose,
    "Concat": concat,
    "Pad": pad,
    "Conv": spatial.conv,
    "ConvTranspose": spatial.conv_transpose,
    "BatchNormalization": spatial.batch_norm,
    "MaxPool": spatial.max_pool,
    "AveragePool": spatial.average_pool,
    "GlobalAveragePool": spatial.global_average_pool,
}
RULES.update(pointwise.RULES)
RULES.update(structural.RULES)
