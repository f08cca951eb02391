"""Backward rules of ops that move, pick or resample values: splits, slices, gathers, resizes,
normalisations over several axes and batched products.

Ops that pick or resample along one axis with constants (Slice with steps, Gather, Resize) are
linear maps along that axis, known when the graph is built: their backward multiplies the
gradient along the axis by the map's [out, in] matrix (`_along_axis`), which never touches the
batch axis.
"""

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from engines.graphs.context import (
    Array,
    Grads,
    NodeGrad,
    first_input_grad,
    same_batch,
    unbroadcast,
    zero_grads,
)

Rule = Callable[[NodeGrad], Grads]

SCATTER_ADD_OPSET = 16  # ScatterElements(reduction="add")
TO_THE_END = 2**31 - 1  # a Slice end at least this large reads "to the end" of any batch


# --- helpers ---------------------------------------------------------------------------------


def _constant(ctx: NodeGrad, index: int, what: str) -> Array:
    value = ctx.info.constant(ctx.input(index)) if ctx.input(index) else None
    if value is None:
        raise ctx.fail(f"its {what} are not a constant")
    return value


def _ints(value: Array | Sequence[int]) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _static(ctx: NodeGrad, name: str) -> list[int]:
    """The dims after the batch axis, which must be static."""
    return list(ctx.static_dims(name)[1:])


def _along_axis(ctx: NodeGrad, grad: str, rank: int, axis: int, matrix: Array) -> str:
    """out[..., d, ...] = sum_k grad[..., k, ...] * matrix[k, d] along `axis` (not the batch)."""
    if axis == rank - 1:
        return ctx.op("MatMul", [grad, ctx.emit.const(matrix.astype(np.float32), "map")])
    if axis == rank - 2:
        transposed = np.ascontiguousarray(matrix.T).astype(np.float32)
        return ctx.op("MatMul", [ctx.emit.const(transposed, "map"), grad])
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    moved = ctx.op("Transpose", [grad], perm=perm)
    mapped = ctx.op("MatMul", [moved, ctx.emit.const(matrix.astype(np.float32), "map")])
    return ctx.op("Transpose", [mapped], perm=perm)


def _one_hot(positions: Sequence[int], size: int) -> Array:
    """[len(positions), size]: row k picks input position positions[k]."""
    matrix = np.zeros((len(positions), size), np.float32)
    matrix[np.arange(len(positions)), list(positions)] = 1.0
    return matrix


def _pad_axis(ctx: NodeGrad, grad: str, rank: int, axis: int, before: int, after: int) -> str:
    if not before and not after:
        return grad
    pads = [0] * (2 * rank)
    pads[axis], pads[rank + axis] = before, after
    return ctx.op("Pad", [grad, ctx.emit.ints(pads)])


def _zeros(ctx: NodeGrad, grad: str, dims: Sequence[int]) -> str:
    """Zeros [M, *dims], M being grad's batch: a product with one gradient column keeps the
    batch's symbolic name, which ConstantOfShape of a computed shape would lose."""
    emit = ctx.emit
    flat = ctx.op("Reshape", [grad, emit.ints([0, -1])])
    column = ctx.op("Slice", [flat, emit.ints([0]), emit.ints([1]), emit.ints([1])])
    zeros = emit.const(np.zeros((1, math.prod(dims)), np.float32), "zeros")
    return ctx.op("Reshape", [ctx.op("Mul", [column, zeros]), emit.ints([0, *dims])])


def _swap_last(ctx: NodeGrad, name: str) -> str:
    rank = ctx.rank(name)
    return ctx.op("Transpose", [name], perm=[*range(rank - 2), rank - 1, rank - 2])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- splitting, slicing, gathering -----------------------------------------------------------


def _split_sizes(ctx: NodeGrad, dim: int) -> list[int]:
    count = len(ctx.node.output)
    if ctx.input(1):
        return _ints(_constant(ctx, 1, "split sizes"))
    if ctx.attr("split", None) is not None:
        return _ints(ctx.attr("split", []))
    outputs = ctx.attr("num_outputs", None)
    if outputs is not None:
        chunk = -(-dim // int(outputs))
        return [chunk] * (int(outputs) - 1) + [dim - chunk * (int(outputs) - 1)]
    if dim % count:
        raise ctx.fail(f"{dim} does not split into {count} equal parts")
    return [dim // count] * count


def split(ctx: NodeGrad) -> Grads:
    """Concatenate the outputs' gradients; outputs without one pad their neighbours with zeros."""
    x = ctx.node.input[0]
    rank = ctx.rank(x)
    axis = ctx.axis(int(ctx.attr("axis", 0)), rank)
    sizes = _split_sizes(ctx, ctx.static_dims(x)[axis])
    pieces: list[list[Any]] = []  # [gradient, zeros before, zeros after]
    pending = 0
    for size, grad in zip(sizes, ctx.grads, strict=True):
        if grad is None:
            pending += size
        else:
            pieces.append([grad, pending, 0])
            pending = 0
    pieces[-1][2] = pending
    parts = [_pad_axis(ctx, g, rank, axis, before, after) for g, before, after in pieces]
    joined = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, axis=axis)
    return first_input_grad(ctx, joined)


def _slice_positions(start: int, end: int, step: int, dim: int) -> list[int]:
    """The positions a Slice reads along one axis, with ONNX's clamping (not Python's)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return list(range(start, end, step))


def slice_(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    x = ctx.node.input[0]
    dims = ctx.dims(x)
    rank = len(dims)
    if ctx.attr("starts", None) is not None:  # opset 1
        starts, ends = _ints(ctx.attr("starts", [])), _ints(ctx.attr("ends", []))
        axes = _ints(ctx.attr("axes", list(range(len(starts)))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(_constant(ctx, 1, "starts")), _ints(_constant(ctx, 2, "ends"))
        axes = _ints(_constant(ctx, 3, "axes")) if ctx.input(3) else list(range(len(starts)))
        steps = _ints(_constant(ctx, 4, "steps")) if ctx.input(4) else [1] * len(starts)
    grad, begin, end = ctx.grad, [0] * rank, [0] * rank
    for start, stop, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis + rank if axis < 0 else axis
        if axis == 0:
            if start != 0 or step != 1 or stop < TO_THE_END:
                raise ctx.fail("it slices the batch axis")
            continue
        dim = dims[axis]
        if not isinstance(dim, int):
            raise ctx.fail(f"axis {axis} of {x!r} is not static")
        positions = _slice_positions(start, stop, step, dim)
        if not positions:
            raise ctx.fail("it keeps nothing of an axis")
        if step == 1:
            begin[axis], end[axis] = positions[0], dim - 1 - positions[-1]
        else:
            grad = _along_axis(ctx, grad, rank, axis, _one_hot(positions, dim))
    if any(begin + end):
        grad = ctx.op("Pad", [grad, ctx.emit.ints(begin + end)])
    return first_input_grad(ctx, grad)


def gather(ctx: NodeGrad) -> Grads:
    x = ctx.node.input[0]
    rank = ctx.rank(x)
    axis = ctx.axis(int(ctx.attr("axis", 0)), rank)
    indices = _constant(ctx, 1, "indices")
    dims = _static(ctx, x)
    size = dims[axis - 1]
    flat = [i + size if i < 0 else i for i in _ints(indices)]
    grad = ctx.grad
    if indices.ndim != 1:  # the indices' axes (none for a scalar) become one
        shape = [0, *dims[: axis - 1], len(flat), *dims[axis:]]
        grad = ctx.op("Reshape", [grad, ctx.emit.ints(shape)])
    return first_input_grad(ctx, _along_axis(ctx, grad, rank, axis, _one_hot(flat, size)))


def gather_elements(ctx: NodeGrad) -> Grads:
    """Scatter-add the gradient back to where each element was read.

    Constant indices carry their own batch axis; one of size 1 is expanded to the gradient's
    batch, which makes one image with several seeds work.
    """
    x = ctx.node.input[0]
    rank = ctx.rank(x)
    axis = ctx.axis(int(ctx.attr("axis", 0)), rank)
    dims = _static(ctx, x)
    indices = _constant(ctx, 1, "indices").astype(np.int64)
    indices = np.where(indices < 0, indices + dims[axis - 1], indices)
    attrs: dict[str, Any] = {"axis": axis}
    if ctx.info.opset >= SCATTER_ADD_OPSET:
        attrs["reduction"] = "add"
    else:
        ordered = np.sort(indices, axis=axis)
        if (np.diff(ordered, axis=axis) == 0).any():
            raise ctx.fail(f"repeated indices need opset {SCATTER_ADD_OPSET}")
    shape = ctx.op("Shape", [ctx.grad])
    expanded = ctx.op("Expand", [ctx.emit.const(indices, "indices"), shape])
    zeros = _zeros(ctx, ctx.grad, dims)
    return first_input_grad(ctx, ctx.op("ScatterElements", [zeros, expanded, ctx.grad], **attrs))


# --- broadcasting and tiling -----------------------------------------------------------------


def expand(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    x = ctx.node.input[0]
    x_dims = ctx.static_dims(x)
    value = ctx.info.constant(ctx.input(1))
    if value is None:
        return first_input_grad(ctx, _expand_to_computed_shape(ctx, x, x_dims))
    shape = _ints(value)
    if len(shape) > len(x_dims):
        raise ctx.fail("it adds leading axes, which moves the batch axis")
    shape = [1] * (len(x_dims) - len(shape)) + shape
    if shape[0] != 1 and ctx.dims(x)[0] != shape[0]:
        raise ctx.fail("it may expand the batch axis")
    out_dims = (None, *(max(d, s) for d, s in zip(x_dims[1:], shape[1:], strict=True)))
    return first_input_grad(ctx, unbroadcast(ctx, ctx.grad, out_dims, x))


def _expand_to_computed_shape(ctx: NodeGrad, x: str, x_dims: tuple[int, ...]) -> str:
    """Expand to a shape computed at run time (`y.expand_as(x)`, as in ECA and other
    attention blocks): the output's inferred shape says which axes were broadcast, provided
    the batch axis is provably the input's own (the same symbol or size)."""
    out = ctx.dims(ctx.node.output[0])
    if len(out) != len(x_dims) or not all(isinstance(d, int) for d in out[1:]):
        raise ctx.fail("its shape is not a constant, and the output's shape is not static")
    if out[0] is None or out[0] != ctx.dims(x)[0]:
        raise ctx.fail("its shape is not a constant, and it may expand the batch axis")
    return unbroadcast(ctx, ctx.grad, (None, *out[1:]), x)


def tile(ctx: NodeGrad) -> Grads:
    """Split each tiled axis into [repeats, size] and sum over the repeats."""
    ctx.only_first_input()
    repeats = _ints(_constant(ctx, 1, "repeats"))
    if repeats[0] != 1:
        raise ctx.fail("it tiles the batch axis")
    shape, summed = [0], []
    for size, count in zip(_static(ctx, ctx.node.input[0]), repeats[1:], strict=True):
        if count != 1:
            summed.append(len(shape))
            shape.append(count)
        shape.append(size)
    if not summed:
        return first_input_grad(ctx, ctx.grad)
    emit = ctx.emit
    split_axes = ctx.op("Reshape", [ctx.grad, emit.ints(shape)])
    return first_input_grad(ctx, ctx.op("ReduceSum", [split_axes, emit.ints(summed)], keepdims=0))


# --- resampling ------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _interpolation(
    op_type: str, opset: int, attrs: tuple[tuple[str, Any], ...], size: int, scale: float, out: int
) -> Array:
    """The [out, in] matrix of a 1-D resize, read off onnxruntime resizing an identity basis.

    The basis is [size, 1, 1, size] (the basis vectors on axis 0, resized along the last axis
    by `scale`, or to `out` when scale is 0), so it takes exactly the forward's arithmetic.
    """
    basis = np.eye(size, dtype=np.float32).reshape(size, 1, 1, size)
    factors = numpy_helper.from_array(np.array([1, 1, 1, scale], np.float32), "scales")
    sizes = numpy_helper.from_array(np.array([size, 1, 1, out], np.int64), "sizes")
    if op_type == "Upsample":
        node = helper.make_node("Upsample", ["x", "scales"], ["y"], **dict(attrs))
        inits = [factors]
    elif scale:
        node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **dict(attrs))
        inits = [factors]
    else:
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **dict(attrs))
        inits = [sizes]
    graph = helper.make_graph(
        [node],
        "basis",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, basis.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    version = helper.make_opsetid("", opset)
    model = helper.make_model(graph, opset_imports=[version])
    model.ir_version = helper.find_min_ir_version_for([version])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    resized = np.asarray(session.run(None, {"x": basis})[0]).reshape(size, -1)
    if resized.shape[1] != out:
        raise ValueError(f"the basis resized to {resized.shape[1]} positions, not {out}")
    return np.ascontiguousarray(resized.T)


def _resample(
    ctx: NodeGrad,
    attrs: dict[str, Any],
    scales: list[float] | None,
    opset: int,
) -> Grads:
    """The backward of a separable resize: one interpolation matrix per resized axis."""
    x, y = ctx.node.input[0], ctx.node.output[0]
    x_dims, y_dims = ctx.static_dims(x), ctx.static_dims(y)
    rank = len(x_dims)
    if scales is not None and scales[0] != 1:
        raise ctx.fail("it resizes the batch axis")
    key = tuple(sorted(attrs.items()))
    grad = ctx.grad
    for axis in range(1, rank):
        scale = scales[axis] if scales is not None else 0.0
        if x_dims[axis] == y_dims[axis] and scale in (0.0, 1.0):
            continue
        try:
            matrix = _interpolation(ctx.node.op_type, opset, key, x_dims[axis], scale, y_dims[axis])
        except Exception as exc:  # onnxruntime refuses the mode or the arithmetic disagrees
            raise ctx.fail(f"cannot resample axis {axis} alone: {exc}") from exc
        grad = _along_axis(ctx, grad, rank, axis, matrix)
    return first_input_grad(ctx, grad)


RESIZE_ATTRS = (
    "mode",
    "coordinate_transformation_mode",
    "nearest_mode",
    "cubic_coeff_a",
    "exclude_outside",
    "antialias",
)


def _resize_scales(ctx: NodeGrad) -> list[float] | None:
    """Per-axis scales if given; None when sizes are (the output's static dims then say them)."""
    x, y = ctx.node.input[0], ctx.node.output[0]
    rank = ctx.rank(x)
    axes = [a + rank if a < 0 else a for a in _ints(ctx.attr("axes", list(range(rank))))]
    scales = ctx.info.constant(ctx.input(2)) if ctx.input(2) else None
    if scales is not None and scales.size:
        full = [1.0] * rank
        for axis, scale in zip(axes, scales.reshape(-1).tolist(), strict=True):
            full[axis] = float(scale)
        return full
    if ctx.input(2) and scales is None:
        raise ctx.fail("its scales are not a constant")
    if not ctx.input(3):
        raise ctx.fail("it has neither scales nor sizes")
    if _text(ctx.attr("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise ctx.fail("only keep_aspect_ratio_policy 'stretch' is supported")
    sizes = ctx.info.constant(ctx.input(3))
    if sizes is None or 0 in axes:
        # The batch keeps its size only if a constant says the input's own static batch, or
        # shape inference carried the input's batch (static or symbolic) through computed sizes.
        batch = ctx.dims(x)[0]
        constant_batch = sizes is not None and _ints(sizes)[axes.index(0)] == batch
        if not constant_batch and not same_batch(ctx, x, y):
            raise ctx.fail("it may resize the batch axis")
    return None


def resize(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    if _text(ctx.attr("coordinate_transformation_mode", "")) == "tf_crop_and_resize":
        raise ctx.fail("tf_crop_and_resize is not supported")
    attrs = {k: ctx.attr(k, None) for k in RESIZE_ATTRS}
    attrs = {k: _text(v) if isinstance(v, bytes) else v for k, v in attrs.items() if v is not None}
    return _resample(ctx, attrs, _resize_scales(ctx), ctx.info.opset)


UPSAMPLE_OPSET = 9


def upsample(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    if ctx.attr("scales", None) is not None:
        scales = [float(s) for s in ctx.attr("scales", [])]
    else:
        scales = [float(s) for s in _constant(ctx, 1, "scales").reshape(-1)]
    mode = _text(ctx.attr("mode", "nearest"))
    return _resample(ctx, {"mode": mode}, scales, UPSAMPLE_OPSET)


# --- moving channels and space ---------------------------------------------------------------


def depth_to_space(ctx: NodeGrad) -> Grads:
    """Both are permutations; DCR's inverse is SpaceToDepth, CRD's is written out."""
    ctx.only_first_input()
    block = int(ctx.attr("blocksize", 1))
    if _text(ctx.attr("mode", "DCR")) == "DCR":
        return first_input_grad(ctx, ctx.op("SpaceToDepth", [ctx.grad], blocksize=block))
    channels, height, width = _static(ctx, ctx.node.input[0])
    emit = ctx.emit
    blocks = ctx.op(
        "Reshape", [ctx.grad, emit.ints([0, channels // block**2, height, block, width, block])]
    )
    moved = ctx.op("Transpose", [blocks], perm=[0, 1, 3, 5, 2, 4])
    shape = emit.ints([0, channels, height, width])
    return first_input_grad(ctx, ctx.op("Reshape", [moved, shape]))


def space_to_depth(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    block = int(ctx.attr("blocksize", 1))
    return first_input_grad(ctx, ctx.op("DepthToSpace", [ctx.grad], blocksize=block, mode="DCR"))


# --- products --------------------------------------------------------------------------------


def matmul(ctx: NodeGrad) -> Grads:
    """Numpy-broadcast batched products. An operand that depends on the input has the batch as
    its axis 0, which must stay the output's axis 0 and must not be a matrix axis of B."""
    a, b = ctx.node.input[0], ctx.node.input[1]
    a_dims, b_dims, out_dims = ctx.dims(a), ctx.dims(b), ctx.dims(ctx.node.output[0])
    grads = zero_grads(ctx)
    if ctx.needs[0]:
        if len(a_dims) < 2 or (len(b_dims) > 1 and len(a_dims) != len(out_dims)):
            raise ctx.fail("its A operand's batch axis would not stay the output's axis 0")
        if len(b_dims) == 1:
            grads[0] = ctx.op("Mul", [ctx.op("Unsqueeze", [ctx.grad, ctx.emit.ints([-1])]), b])
        else:
            grad = ctx.op("MatMul", [ctx.grad, _swap_last(ctx, b)])
            grads[0] = unbroadcast(ctx, grad, (*out_dims[:-1], a_dims[-1]), a)
    if ctx.needs[1]:
        if len(b_dims) < 3 or (len(a_dims) > 1 and len(b_dims) != len(out_dims)):
            raise ctx.fail("its B operand's batch axis would not stay the output's axis 0")
        if len(a_dims) == 1:
            column = ctx.op("Reshape", [a, ctx.emit.ints([-1, 1])])
            row = ctx.op("Unsqueeze", [ctx.grad, ctx.emit.ints([-2])])
            grads[1] = ctx.op("Mul", [row, column])
        else:
            grad = ctx.op("MatMul", [_swap_last(ctx, a), ctx.grad])
            grads[1] = unbroadcast(ctx, grad, (*out_dims[:-2], b_dims[-2], out_dims[-1]), b)
    return grads


def _einsum_terms(ctx: NodeGrad) -> tuple[list[str], str]:
    equation = _text(ctx.attr("equation", "")).replace(" ", "")
    if "." in equation:
        raise ctx.fail("ellipsis ('...') is not supported")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if not arrow:  # implicit output: the labels used once, in alphabetical order
        output = "".join(
            sorted(label for label in set(inputs) if label.isalpha() and inputs.count(label) == 1)
        )
    if len(terms) != len(ctx.node.input):
        raise ctx.fail("its equation does not match its inputs")
    if any(len(set(term)) != len(term) for term in [*terms, output]):
        raise ctx.fail("a label repeats within one term (a diagonal)")
    return terms, output


def einsum(ctx: NodeGrad) -> Grads:
    """Operand i's gradient is the Einsum of the output gradient with the other operands.

    Labels only operand i has (summed out of the forward) come back as broadcast axes. The
    batch label may be 1 in the forward operands and M in the gradient: onnxruntime's Einsum
    broadcasts a label of size 1.
    """
    terms, output = _einsum_terms(ctx)
    batch = output[:1]
    for term, name, need in zip(terms, ctx.node.input, ctx.needs, strict=True):
        if need and (not batch or term[:1] != batch):
            raise ctx.fail(f"operand {name!r} does not keep its batch axis as the output's first")
        if batch and batch in term[1:]:
            raise ctx.fail("the batch label is not the first of every operand")
    grads = zero_grads(ctx)
    for i, term in enumerate(terms):
        if not ctx.needs[i]:
            continue
        others = [j for j in range(len(terms)) if j != i]
        known = set(output).union(*(terms[j] for j in others))
        target = "".join(label for label in term if label in known)
        equation = ",".join([output, *(terms[j] for j in others)]) + "->" + target
        grad = ctx.op("Einsum", [ctx.grad, *(ctx.node.input[j] for j in others)], equation=equation)
        if target != term:
            dims = ctx.static_dims(ctx.node.input[i])
            missing = [k for k, label in enumerate(term) if label not in known]
            grad = ctx.op("Unsqueeze", [grad, ctx.emit.ints(missing)])
            shape = [dims[k] if k in missing else 1 for k in range(len(term))]
            grad = ctx.op("Expand", [grad, ctx.emit.ints(shape)])
        grads[i] = grad
    return grads


# --- normalisations --------------------------------------------------------------------------


def _mean(ctx: NodeGrad, x: str, axes: Sequence[int], count: int) -> str:
    total = ctx.op("ReduceSum", [x, ctx.emit.ints(axes)], keepdims=1)
    return ctx.op("Mul", [total, ctx.emit.scalar(1.0 / count)])


def _normalised_grad(
    ctx: NodeGrad, x: str, grad: str, scale: str | None, axes: Sequence[int], count: int
) -> str:
    """dx of y = xhat * scale + bias, xhat = (x - mean) / sigma over `axes` (count elements):
    (1 / sigma) * (gs - mean(gs) - xhat * mean(gs * xhat)), gs = grad * scale."""
    epsilon = float(ctx.attr("epsilon", 1e-5))
    centred = ctx.op("Sub", [x, _mean(ctx, x, axes, count)])
    variance = _mean(ctx, ctx.op("Mul", [centred, centred]), axes, count)
    deviation = ctx.op("Sqrt", [ctx.op("Add", [variance, ctx.emit.scalar(epsilon)])])
    inverse = ctx.op("Reciprocal", [deviation])
    xhat = ctx.op("Mul", [centred, inverse])
    scaled = ctx.op("Mul", [grad, scale]) if scale else grad
    along = ctx.op("Mul", [xhat, _mean(ctx, ctx.op("Mul", [scaled, xhat]), axes, count)])
    centred_grad = ctx.op("Sub", [ctx.op("Sub", [scaled, _mean(ctx, scaled, axes, count)]), along])
    return ctx.op("Mul", [centred_grad, inverse])


def _no_statistics_grads(ctx: NodeGrad) -> None:
    if any(grad is not None for grad in ctx.grads[1:]):
        raise ctx.fail("its mean or inverse deviation output is differentiated")


def layer_norm(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    _no_statistics_grads(ctx)
    x = ctx.node.input[0]
    dims = ctx.static_dims(x)
    axis = ctx.axis(int(ctx.attr("axis", -1)), len(dims))
    axes = list(range(axis, len(dims)))
    count = math.prod(dims[axis:])
    return first_input_grad(ctx, _normalised_grad(ctx, x, ctx.grad, ctx.input(1), axes, count))


def instance_norm(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    x = ctx.node.input[0]
    dims = ctx.static_dims(x)
    per_channel = ctx.op("Reshape", [ctx.input(1), ctx.emit.ints([-1] + [1] * (len(dims) - 2))])
    axes = list(range(2, len(dims)))
    grad = _normalised_grad(ctx, x, ctx.grad, per_channel, axes, math.prod(dims[2:]))
    return first_input_grad(ctx, grad)


def group_norm(ctx: NodeGrad) -> Grads:
    """Normalised per (sample, group): in the view [N, G, C / G, spatial] over the last two
    axes. The scale is per group (opset 18) or per channel (opset 21)."""
    ctx.only_first_input()
    x = ctx.node.input[0]
    channels, *spatial = _static(ctx, x)
    groups = int(ctx.attr("num_groups", 1))
    if channels % groups:
        raise ctx.fail(f"{channels} channels do not split into {groups} groups")
    emit, size = ctx.emit, math.prod(spatial)
    view = emit.ints([0, groups, channels // groups, size])
    scale_dims = ctx.dims(ctx.input(1))
    scale_view = [groups, 1, 1] if scale_dims == (groups,) else [groups, channels // groups, 1]
    scale = ctx.op("Reshape", [ctx.input(1), emit.ints(scale_view)])
    grouped_x, grouped_grad = ctx.op("Reshape", [x, view]), ctx.op("Reshape", [ctx.grad, view])
    grad = _normalised_grad(ctx, grouped_x, grouped_grad, scale, [2, 3], size * channels // groups)
    return first_input_grad(ctx, ctx.op("Reshape", [grad, emit.ints([0, channels, *spatial])]))


def lrn(ctx: NodeGrad) -> Grads:
    """y = x * s^-beta, s = bias + alpha / size * window sum of x^2 over channels:
    dx = g * s^-beta - 2 alpha beta / size * x * window^T(g * x * s^-beta / s)."""
    ctx.only_first_input()
    x = ctx.node.input[0]
    channels, *spatial = _static(ctx, x)
    size = int(ctx.attr("size", 1))
    alpha, beta = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75))
    bias = float(ctx.attr("bias", 1.0))
    lower, upper = (size - 1) // 2, -(-(size - 1) // 2)
    offsets = np.arange(channels)[None, :] - np.arange(channels)[:, None]  # [c, i]: i - c
    window = ((offsets >= -lower) & (offsets <= upper)).astype(np.float32)
    kernel_shape = [1] * len(spatial)
    emit = ctx.emit

    def channel_sum(tensor: str, matrix: Array) -> str:
        weight = emit.const(matrix.reshape(channels, channels, *kernel_shape), "lrn_window")
        return ctx.op("Conv", [tensor, weight], kernel_shape=kernel_shape)

    squares = channel_sum(ctx.op("Mul", [x, x]), window)
    base = ctx.op("Add", [ctx.op("Mul", [squares, emit.scalar(alpha / size)]), emit.scalar(bias)])
    power = ctx.op("Pow", [base, emit.scalar(-beta)])
    direct = ctx.op("Mul", [ctx.grad, power])
    weighted = ctx.op("Mul", [ctx.op("Mul", [ctx.grad, x]), ctx.op("Div", [power, base])])
    spread = channel_sum(weighted, np.ascontiguousarray(window.T))
    through = ctx.op("Mul", [ctx.op("Mul", [spread, x]), emit.scalar(2 * alpha * beta / size)])
    return first_input_grad(ctx, ctx.op("Sub", [direct, through]))


RULES: dict[str, Rule] = {
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "GatherElements": gather_elements,
    "Expand": expand,
    "Tile": tile,
    "Resize": resize,
    "Upsample": upsample,
    "DepthToSpace": depth_to_space,
    "SpaceToDepth": space_to_depth,
    "MatMul": matmul,
    "Einsum": einsum,
    "LayerNormalization": layer_norm,
    "InstanceNormalization": instance_norm,
    "GroupNormalization": group_norm,
    "LRN": lrn,
}
