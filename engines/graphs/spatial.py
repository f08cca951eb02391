"""Backward rules of the sliding-window ops: Conv, ConvTranspose, pooling, batch norm.

Conv's input gradient is the transposed convolution. onnxruntime's ConvTranspose loops over
groups and is ~10x slower than Conv for depthwise kernels, so with a constant kernel it is
written as a stride-1 Conv on the flipped, group-transposed kernel (fast, blocked-layout
depthwise kernels apply); a stride > 1 first spreads the gradient out with zeros (a cheap
single-channel ConvTranspose). For group 1 a strided ConvTranspose is a plain GEMM and is used
as is, as it is for kernels that are not constants.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engines.graphs import masks
from engines.graphs.context import (
    FLT_MAX,
    Array,
    Grads,
    NodeGrad,
    first_input_grad,
    reshape_like,
)

COL2IM_OPSET = 18


@dataclass(frozen=True)
class Window:
    """One spatial axis of a sliding window: input size, output size and the window's geometry."""

    size: int
    out: int
    kernel: int
    stride: int
    dilation: int
    begin: int
    end: int

    @property
    def span(self) -> int:
        return (self.kernel - 1) * self.dilation + 1

    @property
    def overhang(self) -> int:
        """How far the last window reaches past the input's end (negative: short of it)."""
        return self.stride * (self.out - 1) + self.span - self.begin - self.size

    @property
    def transpose_end(self) -> tuple[int, int]:
        """End pad and output_padding of a ConvTranspose taking `out` positions back to `size`."""
        end = self.overhang
        return (end, 0) if end >= 0 else (0, -end)

    @staticmethod
    def whole(size: int) -> "Window":
        """An axis that is not pooled: every position is its own window."""
        return Window(size, size, 1, 1, 1, 0, 0)


def _resolve_pads(
    ctx: NodeGrad, sizes: Sequence[int], kernels: Sequence[int], strides: Sequence[int]
) -> list[int]:
    dilations = list(ctx.attr("dilations", [1] * len(sizes)))
    auto_pad = ctx.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "NOTSET":
        return list(ctx.attr("pads", [0] * (2 * len(sizes))))
    if auto_pad == "VALID":
        return [0] * (2 * len(sizes))
    begins, ends = [], []
    for size, kernel, stride, dilation in zip(sizes, kernels, strides, dilations, strict=True):
        span = (kernel - 1) * dilation + 1
        total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def windows(ctx: NodeGrad, kernels: Sequence[int]) -> list[Window]:
    """The geometry of the node's window on each spatial axis (static shapes required)."""
    x_dims = ctx.static_dims(ctx.node.input[0])[2:]
    y_dims = ctx.static_dims(ctx.node.output[0])[2:]
    rank = len(x_dims)
    strides = list(ctx.attr("strides", [1] * rank))
    dilations = list(ctx.attr("dilations", [1] * rank))
    pads = _resolve_pads(ctx, x_dims, kernels, strides)
    return [
        Window(x_dims[i], y_dims[i], kernels[i], strides[i], dilations[i], pads[i], pads[i + rank])
        for i in range(rank)
    ]


def _conv_attrs(axes: Sequence[Window], group: int) -> dict[str, list[int] | int]:
    return {
        "kernel_shape": [a.kernel for a in axes],
        "dilations": [a.dilation for a in axes],
        "group": group,
    }


# --- Conv ------------------------------------------------------------------------------------


def conv(ctx: NodeGrad) -> Grads:
    ctx.only_first_input()
    weight_name = ctx.node.input[1]
    kernel_dims = ctx.dims(weight_name)[2:]
    kernels = [d for d in kernel_dims if isinstance(d, int)]
    if len(kernels) != len(kernel_dims):
        raise ctx.fail("its kernel shape is not static")
    axes = windows(ctx, kernels)
    group = int(ctx.attr("group", 1))
    weight = ctx.info.constant(weight_name)
    strided = any(a.stride > 1 for a in axes)
    if weight is not None and group == 1 and _by_phases(axes):
        return first_input_grad(ctx, _phase_conv(ctx, weight, axes))
    if weight is None or (strided and group == 1):
        return first_input_grad(ctx, _conv_transpose(ctx, ctx.grad, weight_name, axes, group))
    grad, sizes = ctx.grad, [a.out for a in axes]
    if strided:
        grad, sizes = _spread(ctx, grad, axes, int(weight.shape[0]))
    return first_input_grad(ctx, _flipped_conv(ctx, grad, sizes, weight, axes, group))


def _by_phases(axes: Sequence[Window]) -> bool:
    """Whether the transposed convolution runs faster as one stride-1 Conv per output phase.

    onnxruntime's ConvTranspose spends most of its time in col2im: 3.1 ms for the gradient of a
    7x7 stride-2 stem (16 -> 3 channels, 224x224), where the phases' Conv and DepthToSpace take
    well under one. For 3x3 stride 2 the ConvTranspose is still the faster (0.34 ms against
    0.54 on EfficientNet-Lite0's stem), hence kernels of at least stride + 2.
    """
    strides = {a.stride for a in axes}
    return (
        len(axes) == 2
        and len(strides) == 1
        and min(strides) > 1
        and all(a.dilation == 1 and a.kernel >= a.stride + 2 for a in axes)
    )


def _phase_conv(ctx: NodeGrad, weight: Array, axes: Sequence[Window]) -> str:
    """The input gradient of a strided Conv as s*s stride-1 Convs, one per output phase.

    Input pixel i = q * s + r - begin collects w[r + s * m] * g[q - m]: for each phase r a
    correlation of the gradient with that phase's taps of the kernel, reversed. All phases run
    as one Conv whose output channels are (input channel, phase row, phase column), and
    DepthToSpace (CRD) interleaves them.
    """
    stride = axes[0].stride
    taps = [math.ceil(a.kernel / stride) for a in axes]
    c_out, c_in = int(weight.shape[0]), int(weight.shape[1])
    kernel = np.zeros((c_in, stride, stride, c_out, *taps), np.float32)
    for ry in range(stride):
        for rx in range(stride):
            for jy in range(taps[0]):
                for jx in range(taps[1]):
                    ty = ry + stride * (taps[0] - 1 - jy)
                    tx = rx + stride * (taps[1] - 1 - jx)
                    if ty < axes[0].kernel and tx < axes[1].kernel:
                        kernel[:, ry, rx, :, jy, jx] = weight[:, :, ty, tx].T
    phases = ctx.op(
        "Conv",
        [ctx.grad, ctx.emit.const(kernel.reshape(c_in * stride * stride, c_out, *taps), "phases")],
        kernel_shape=taps,
        pads=[t - 1 for t in taps] + list(taps),
    )
    emit = ctx.emit
    if ctx.info.opset >= COL2IM_OPSET:
        # Col2Im of non-overlapping blocks is DepthToSpace, and ~8x faster in onnxruntime
        # (0.04 against 0.34 ms for densenet's stem gradient, [1, 12, 112, 112]).
        blocks = [
            Window(stride * (a.out + t), a.out + t, stride, stride, 1, 0, 0)
            for a, t in zip(axes, taps, strict=True)
        ]
        image = _col2im(ctx, phases, c_in * stride * stride, blocks)
    else:
        image = ctx.op("DepthToSpace", [phases], blocksize=stride, mode="CRD")
    starts = emit.ints([a.begin for a in axes])
    ends = emit.ints([a.begin + a.size for a in axes])
    return ctx.op("Slice", [image, starts, ends, emit.ints([2, 3])])


def _col2im(ctx: NodeGrad, blocks: str, channels: int, axes: Sequence[Window]) -> str:
    """Col2Im of `blocks` ([N, channels * block, *outs]) onto the input of windows `axes`: each
    window's block is added back where it was read, its pads left out."""
    emit = ctx.emit
    columns = ctx.op("Reshape", [blocks, emit.ints([0, channels, -1])])
    return ctx.op(
        "Col2Im",
        [columns, emit.ints([a.size for a in axes]), emit.ints([a.kernel for a in axes])],
        strides=[a.stride for a in axes],
        dilations=[a.dilation for a in axes],
        pads=[*(a.begin for a in axes), *_ends(axes)],
    )


def _ends(axes: Sequence[Window]) -> list[int]:
    """The end pads the windows read past each axis (0 where they stop short)."""
    return [max(a.overhang, 0) for a in axes]


def _conv_transpose(
    ctx: NodeGrad, grad: str, weight: str, axes: Sequence[Window], group: int
) -> str:
    ends = [a.transpose_end for a in axes]
    return ctx.op(
        "ConvTranspose",
        [grad, weight],
        strides=[a.stride for a in axes],
        pads=[a.begin for a in axes] + [end for end, _ in ends],
        output_padding=[extra for _, extra in ends],
        **_conv_attrs(axes, group),
    )


def _per_channel_transpose(
    ctx: NodeGrad,
    grad: str,
    channels: int,
    axes: Sequence[Window],
    kernels: Sequence[int],
    ends: Sequence[tuple[int, int]],
) -> str:
    """A single-channel ConvTranspose of a ones kernel applied to every channel of `grad`.

    The channels become a spatial axis of size C with kernel 1 ([M, 1, C, ...]): that keeps
    the batch axis apart (and its symbolic name), and onnxruntime's ConvTranspose stays a
    cheap single-channel GEMM + col2im rather than a slow per-group loop.
    """
    emit = ctx.emit
    lifted = ctx.op("Reshape", [grad, emit.ints([0, 1, channels, *(a.out for a in axes)])])
    ones = emit.const(np.ones([1, 1, 1, *kernels], np.float32), "ones")
    spread = ctx.op(
        "ConvTranspose",
        [lifted, ones],
        kernel_shape=[1, *kernels],
        strides=[1, *(a.stride for a in axes)],
        dilations=[1, *(a.dilation if k > 1 else 1 for a, k in zip(axes, kernels, strict=True))],
        pads=[0, *(a.begin for a in axes), 0, *(end for end, _ in ends)],
        output_padding=[0, *(extra for _, extra in ends)],
    )
    sizes = [
        a.stride * (a.out - 1) + extra + (k - 1) * a.dilation + 1 - a.begin - end
        for a, k, (end, extra) in zip(axes, kernels, ends, strict=True)
    ]
    return ctx.op("Reshape", [spread, emit.ints([0, channels, *sizes])])


def _spread(
    ctx: NodeGrad, grad: str, axes: Sequence[Window], channels: int
) -> tuple[str, list[int]]:
    """The gradient with stride - 1 zeros between neighbours, and its new spatial sizes.

    From opset 18 that is Col2Im with 1x1 blocks, twice as fast as the single-channel
    ConvTranspose (0.36 against 0.67 ms for MobileNetV2's [1, 96, 56, 56]).
    """
    sizes = [a.stride * (a.out - 1) + 1 for a in axes]
    plain = [Window(n, a.out, 1, a.stride, 1, 0, 0) for n, a in zip(sizes, axes, strict=True)]
    if ctx.info.opset >= COL2IM_OPSET and len(axes) == 2:
        return _col2im(ctx, grad, channels, plain), sizes
    spread = _per_channel_transpose(
        ctx, grad, channels, plain, [1] * len(axes), [(0, 0)] * len(axes)
    )
    return spread, sizes


def _adjoint_kernel(weight: Array, group: int) -> Array:
    """[Cout, Cin/g, *k] -> [Cin, Cout/g, *k] per group, flipped along every spatial axis."""
    c_out, c_in_group, *kernel = weight.shape
    grouped = weight.reshape(group, c_out // group, c_in_group, *kernel)
    swapped = np.swapaxes(grouped, 1, 2).reshape(group * c_in_group, c_out // group, *kernel)
    spatial = tuple(range(2, swapped.ndim))
    return np.ascontiguousarray(np.flip(swapped, axis=spatial)).astype(np.float32)


def _flipped_conv(
    ctx: NodeGrad,
    grad: str,
    sizes: Sequence[int],
    weight: Array,
    axes: Sequence[Window],
    group: int,
) -> str:
    """The stride-1 transposed convolution of `grad` (spatial `sizes`) as a Conv."""
    begins = [a.span - 1 - a.begin for a in axes]
    ends = [a.size - size + a.begin for a, size in zip(axes, sizes, strict=True)]
    kernel = ctx.emit.const(_adjoint_kernel(weight, group), "kernel")
    out = ctx.op(
        "Conv",
        [grad, kernel],
        pads=[max(p, 0) for p in begins + ends],
        **_conv_attrs(axes, group),
    )
    # Pads wider than the kernel leave input pixels no window reaches: cut the extra rows off.
    if min(begins + ends) >= 0:
        return out
    cut_begin = [max(-p, 0) for p in begins]
    spatial = list(range(2, 2 + len(axes)))
    emit = ctx.emit
    starts = emit.ints(cut_begin)
    stops = emit.ints([c + a.size for c, a in zip(cut_begin, axes, strict=True)])
    return ctx.op("Slice", [out, starts, stops, emit.ints(spatial)])


def conv_transpose(ctx: NodeGrad) -> Grads:
    """The adjoint of ConvTranspose is Conv with the same kernel, strides and pads."""
    ctx.only_first_input()
    if ctx.attr("output_shape", None) is not None:
        raise ctx.fail("output_shape is not supported, give pads instead")
    if ctx.attr("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise ctx.fail("auto_pad SAME is not supported, give pads instead")
    kernel_dims = ctx.static_dims(ctx.node.input[1])[2:]
    rank = len(kernel_dims)
    strides = list(ctx.attr("strides", [1] * rank))
    extras = list(ctx.attr("output_padding", [0] * rank))
    if any(extra >= stride for extra, stride in zip(extras, strides, strict=True)):
        raise ctx.fail("output_padding must be smaller than the stride")
    grad = ctx.op(
        "Conv",
        [ctx.grad, ctx.node.input[1]],
        kernel_shape=list(kernel_dims),
        strides=strides,
        dilations=list(ctx.attr("dilations", [1] * rank)),
        pads=list(ctx.attr("pads", [0] * (2 * rank))),
        group=int(ctx.attr("group", 1)),
    )
    return first_input_grad(ctx, grad)


# --- pooling ---------------------------------------------------------------------------------


def global_average_pool(ctx: NodeGrad) -> Grads:
    x_dims = ctx.static_dims(ctx.node.input[0])
    scaled = ctx.op("Mul", [ctx.grad, ctx.emit.scalar(1.0 / math.prod(x_dims[2:]))])
    return first_input_grad(ctx, ctx.op("Expand", [scaled, ctx.emit.ints([1, *x_dims[1:]])]))


def _window_counts(axis: Window, include_pad: bool) -> Array:
    """How many input (or pad, if included) positions each output window averages over."""
    low, high = (-axis.begin, axis.size + axis.end) if include_pad else (0, axis.size)
    starts = np.arange(axis.out) * axis.stride - axis.begin
    taps = starts[:, None] + np.arange(axis.kernel)[None, :] * axis.dilation
    counts: Array = ((taps >= low) & (taps < high)).sum(axis=1)
    return counts


def average_pool(ctx: NodeGrad) -> Grads:
    """Divide by each window's count, then spread with a ones kernel (a ConvTranspose)."""
    kernels = list(ctx.attr("kernel_shape", []))
    axes = windows(ctx, kernels)
    include_pad = bool(ctx.attr("count_include_pad", 0))
    counts = np.ones([1, 1], np.float64)
    for axis in axes:
        counts = np.multiply.outer(counts, _window_counts(axis, include_pad))
    counts = counts.reshape([1, 1, *(a.out for a in axes)])
    inverse = ctx.emit.const((1.0 / counts).astype(np.float32), "counts")
    scaled = ctx.op("Mul", [ctx.grad, inverse])
    channels = ctx.static_dims(ctx.node.input[0])[1]
    ends = [a.transpose_end for a in axes]
    return first_input_grad(ctx, _per_channel_transpose(ctx, scaled, channels, axes, kernels, ends))


def max_pool(ctx: NodeGrad) -> Grads:
    """Each window's gradient goes to the position its maximum came from (the first of ties)."""
    two_d = len(ctx.static_dims(ctx.node.input[0])) == 4
    indices_read = len(ctx.node.output) > 1 and bool(ctx.node.output[1])
    if ctx.info.opset >= COL2IM_OPSET and two_d and not indices_read:
        return _max_pool_by_patches(ctx)
    return _max_pool_by_indices(ctx)


def _max_pool_by_patches(ctx: NodeGrad) -> Grads:
    """Without MaxPool's Indices, whose kernel runs ~30x slower than the plain MaxPool.

    A stride-1 k x k pool is two pools, 1 x k along the rows and then k x 1 along the
    columns: the same maxima, and the first maximum in the window's row-major order is the
    first in the topmost row holding it, which is where the two routings send the gradient.
    That reads 2k taps per position instead of k*k.
    """
    x, y = ctx.node.input[0], ctx.node.output[0]
    channels = ctx.static_dims(x)[1]
    axes = windows(ctx, list(ctx.attr("kernel_shape", [])))
    if not _separable(axes):
        return first_input_grad(ctx, _route_to_maxima(ctx, x, y, ctx.grad, axes, channels))
    rows, columns = axes
    along_rows = [Window.whole(rows.size), columns]
    row_maxima = ctx.op(
        "MaxPool",
        [x],
        kernel_shape=[1, columns.kernel],
        strides=[1, columns.stride],
        dilations=[1, columns.dilation],
        pads=[0, columns.begin, 0, *_ends([columns])],
    )
    along_columns = [rows, Window.whole(columns.out)]
    grad = _route_to_maxima(ctx, row_maxima, y, ctx.grad, along_columns, channels)
    return first_input_grad(ctx, _route_to_maxima(ctx, x, row_maxima, grad, along_rows, channels))


def _separable(axes: Sequence[Window]) -> bool:
    """Whether routing row by row, then column by column, reads fewer taps than the window."""
    if len(axes) != 2 or min(a.kernel for a in axes) < 2:
        return False
    rows, columns = axes
    whole = rows.kernel * columns.kernel * rows.out * columns.out
    return columns.kernel * rows.size * columns.out + rows.kernel * rows.out * columns.out < whole


def _route_to_maxima(
    ctx: NodeGrad, x: str, y: str, grad: str, axes: Sequence[Window], channels: int
) -> str:
    """The gradient of y = MaxPool(x) over windows `axes`: each window's to its first maximum.

    The windows' values come out as channels of a one-hot depthwise Conv of the input padded
    with -FLT_MAX ([N, C * k*k, OH, OW]); the first tap of each window equal to its maximum
    (an exclusive CumSum of the equality masks is 0 there) receives the window's gradient, and
    Col2Im adds the taps back onto the image.
    """
    kernels = [a.kernel for a in axes]
    taps = math.prod(kernels)
    ends = _ends(axes)
    emit = ctx.emit
    padded = x
    if any(a.begin for a in axes) or any(ends):
        pads = emit.ints([0, 0, *(a.begin for a in axes), 0, 0, *ends])
        padded = ctx.op("Pad", [x, pads, emit.scalar(-FLT_MAX)])
    one_hot = np.broadcast_to(
        np.eye(taps, dtype=np.float32).reshape(1, taps, 1, *kernels), (channels, taps, 1, *kernels)
    )
    patches = ctx.op(
        "Conv",
        [padded, emit.const(one_hot.reshape(channels * taps, 1, *kernels), "one_hot")],
        kernel_shape=kernels,
        strides=[a.stride for a in axes],
        dilations=[a.dilation for a in axes],
        group=channels,
    )
    outs = [a.out for a in axes]
    windows_taps = ctx.op("Reshape", [patches, emit.ints([0, channels, taps, *outs])])
    maxima = ctx.op("Unsqueeze", [y, emit.ints([2])])
    # patch - max is 0 at the maximum and below it elsewhere: a step at 0 marks the maxima.
    equal = ctx.op(
        "HardSigmoid", [ctx.op("Sub", [windows_taps, maxima])], alpha=masks.SLOPE, beta=1.0
    )
    earlier = ctx.op("CumSum", [equal, emit.const(np.array(2, np.int64), "axis")], exclusive=1)
    first = ctx.op("Relu", [ctx.op("Sub", [equal, earlier])])
    routed = ctx.op("Mul", [first, ctx.op("Unsqueeze", [grad, emit.ints([2])])])
    return _col2im(ctx, routed, channels * taps, axes)


def _max_pool_by_indices(ctx: NodeGrad) -> Grads:
    """Scatter-add each window's gradient to the position its maximum came from.

    MaxPool's Indices index the flattened [N, C, H, W] input; modulo C*H*W they index one
    sample, which makes them valid for any gradient batch M.
    """
    if int(ctx.attr("storage_order", 0)) != 0:
        raise ctx.fail("column-major indices are not supported")
    x_dims = ctx.static_dims(ctx.node.input[0])
    y_dims = ctx.static_dims(ctx.node.output[0])
    if len(ctx.node.output) < 2 or not ctx.node.output[1]:
        del ctx.node.output[1:]
        ctx.node.output.append(ctx.emit.fresh(f"{ctx.hint}/indices"))
    emit, sample, windows_per_sample = ctx.emit, math.prod(x_dims[1:]), math.prod(y_dims[1:])
    indices = ctx.op("Reshape", [ctx.node.output[1], emit.ints([-1, windows_per_sample])])
    indices = ctx.op("Mod", [indices, emit.const(np.array(sample, np.int64), "sample_size")])
    updates = ctx.op("Reshape", [ctx.grad, emit.ints([0, windows_per_sample])])
    indices = ctx.op("Expand", [indices, ctx.op("Shape", [updates])])
    # Zeros [M, C*H*W] as a broadcast product with one gradient column, which keeps the
    # symbolic batch name (ConstantOfShape of a computed shape would lose it).
    column = ctx.op("Slice", [updates, emit.ints([0]), emit.ints([1]), emit.ints([1])])
    zeros = ctx.op("Mul", [column, emit.const(np.zeros((1, sample), np.float32), "zeros")])
    summed = ctx.op("ScatterElements", [zeros, indices, updates], axis=1, reduction="add")
    return first_input_grad(ctx, reshape_like(ctx, summed, ctx.node.input[0], keep_batch=True))


# --- batch norm ------------------------------------------------------------------------------


def batch_norm(ctx: NodeGrad) -> Grads:
    """Inference mode: y = x * scale / sqrt(var + eps) + const, per channel."""
    ctx.only_first_input()
    if int(ctx.attr("training_mode", 0)) or len([o for o in ctx.node.output if o]) > 1:
        raise ctx.fail("training mode")
    rank = ctx.rank(ctx.node.input[0])
    epsilon = float(ctx.attr("epsilon", 1e-5))
    scale, variance = ctx.info.constant(ctx.input(1)), ctx.info.constant(ctx.input(4))
    channel_shape = [-1] + [1] * (rank - 2)
    if scale is not None and variance is not None:
        factor = scale.astype(np.float64) / np.sqrt(variance.astype(np.float64) + epsilon)
        coefficient = ctx.emit.const(factor.reshape(channel_shape).astype(np.float32), "bn")
    else:
        deviation = ctx.op("Sqrt", [ctx.op("Add", [ctx.input(4), ctx.emit.scalar(epsilon)])])
        ratio = ctx.op("Div", [ctx.input(1), deviation])
        coefficient = ctx.op("Reshape", [ratio, ctx.emit.ints(channel_shape)])
    return first_input_grad(ctx, ctx.op("Mul", [ctx.grad, coefficient]))
