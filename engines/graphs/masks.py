"""Elementwise helpers for the activation rules: affine maps, clipped ramps and 0/1 masks.

onnxruntime runs CNNs in its blocked NCHWc layout, and every op outside that layout costs two
reorders. Of the elementwise ops only Mul/Add/Sum of equal shapes, Relu, Sigmoid and HardSigmoid
stay blocked (Sub, Div, Where, Greater, Clip with scalars do not). So a 0/1 mask is a HardSigmoid
with a huge slope, Clip(slope * (x - t), 0, 1); on a 4-D feature map `affine` is a depthwise 1x1
Conv (weight w, bias b), and a `ramp` to other bounds that Conv plus a Clip onnxruntime fuses
into it. Elsewhere they are plain Mul/Add/Clip.

Masks are exact, not approximations: with SLOPE a power of two, SLOPE * (x - t) has the sign of
x - t, and is >= 1 in magnitude unless |x - t| < 2^-100 or so (far below what a CNN's feature
maps hold), so Clip(., 0, 1) gives exactly 0 or 1.
"""

import numpy as np

from engines.graphs.context import NodeGrad

SLOPE = 2.0**100


def _channels(ctx: NodeGrad, x: str) -> int | None:
    """The channel count if `x` is an NCHW feature map with a static channel axis."""
    dims = ctx.info.shapes.get(x)
    if dims is None or len(dims) != 4 or not isinstance(dims[1], int):
        return None
    return dims[1]


def affine(ctx: NodeGrad, x: str, weight: float, bias: float) -> str:
    """weight * x + bias."""
    channels = _channels(ctx, x)
    emit = ctx.emit
    if channels is not None:
        kernel = emit.const(np.full((channels, 1, 1, 1), weight, np.float32), "affine_w")
        offset = emit.const(np.full((channels,), bias, np.float32), "affine_b")
        return ctx.op("Conv", [x, kernel, offset], group=channels, kernel_shape=[1, 1])
    scaled = x if weight == 1.0 else ctx.op("Mul", [x, emit.scalar(weight)])
    return scaled if bias == 0.0 else ctx.op("Add", [scaled, emit.scalar(bias)])


def ramp(ctx: NodeGrad, x: str, weight: float, bias: float, low: float, high: float) -> str:
    """Clip(weight * x + bias, low, high)."""
    if (low, high) == (0.0, 1.0):
        return ctx.op("HardSigmoid", [x], alpha=weight, beta=bias)
    line = affine(ctx, x, weight, bias)
    return ctx.op("Clip", [line, ctx.emit.scalar(low), ctx.emit.scalar(high)])


def above(ctx: NodeGrad, x: str, threshold: float) -> str:
    """1.0 where x > threshold, else 0.0."""
    return ramp(ctx, x, SLOPE, -SLOPE * threshold, 0.0, 1.0)


def below(ctx: NodeGrad, x: str, threshold: float) -> str:
    """1.0 where x < threshold, else 0.0."""
    return ramp(ctx, x, -SLOPE, SLOPE * threshold, 0.0, 1.0)


def at_least(ctx: NodeGrad, x: str, threshold: float, value: float = 1.0) -> str:
    """`value` where x >= threshold, else 0.0 (x > the float just below the threshold)."""
    previous = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    bounds = (0.0, value) if value >= 0 else (value, 0.0)
    sign = 1.0 if value >= 0 else -1.0
    return ramp(ctx, x, sign * SLOPE, -sign * SLOPE * previous, *bounds)


def inside(ctx: NodeGrad, x: str, radius: float) -> str:
    """1.0 where -radius < x < radius, for x known to lie in [-radius, radius] (a Clip's output).

    One step on the square, x * x < radius^2: two passes (the square reads a single tensor)
    where a step at each bound and their product take three. The threshold is radius^2 as
    float32 rounds it, which x = +-radius reach exactly; an x within rounding of a bound
    (|x| > radius * (1 - 2^-24) or so) reads as the bound.
    """
    threshold = float(np.float32(radius) * np.float32(radius))
    squared = ctx.op("Mul", [x, x])
    return ramp(ctx, squared, -SLOPE, SLOPE * threshold, 0.0, 1.0)


def product(ctx: NodeGrad, *factors: str) -> str:
    result = factors[0]
    for factor in factors[1:]:
        result = ctx.op("Mul", [result, factor])
    return result
