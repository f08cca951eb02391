"""The backward rules of engines.graphs.pointwise against central finite differences.

The harness is tests.test_gradients': each case is `x -> op(s) -> h` plus a random read-out to
`logits`. Log, Sqrt, Pow and Reciprocal read `p = |x| + 1/2`, which keeps them away from 0.
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from engines.errors import UnsupportedModel
from engines.graphs import GradientSpec, build_gradient_model, supported_ops
from tests.test_gradients import (
    BATCH,
    CLASSES,
    STEP,
    Case,
    _array,
    assert_close,
    check_input_gradient,
    classifier,
    ints,
    node,
    numeric_gradient,
    run_gradients,
    scalar,
    w,
)

MAP = (3, 5, 5)
VECTOR = (6,)
POSITIVE = (node("Abs", ["x"], "ax"), node("Add", ["ax", "half"], "p"))
HALF = {"half": scalar(0.5)}


def _reduce(
    name: str,
    op_type: str,
    shape: tuple[int, ...],
    opset: int,
    axes: list[int] | None = None,
    **attrs: Any,
) -> Case:
    """A reduction, with `axes` as an attribute below opset 18 (ReduceSum: 13), else an input."""
    inputs, weights = ["x"], {}
    if axes is not None:
        if opset >= 18 or op_type == "ReduceSum":
            inputs.append("axes")
            weights["axes"] = ints(*axes)
        else:
            attrs["axes"] = axes
    return Case(name, shape, (node(op_type, inputs, **attrs),), weights, opset=opset)


CASES = [
    # reductions: axes as attribute and as input, keepdims 0/1, negative axes, no-op
    _reduce("reduce_mean_spatial", "ReduceMean", MAP, 17, axes=[2, 3]),
    _reduce("reduce_mean_channels_dropped", "ReduceMean", MAP, 17, axes=[1], keepdims=0),
    _reduce("reduce_mean_18", "ReduceMean", MAP, 18, axes=[-1, 2], keepdims=0),
    _reduce("reduce_mean_2d", "ReduceMean", VECTOR, 18, axes=[1]),
    _reduce("reduce_sum", "ReduceSum", MAP, 17, axes=[1], keepdims=0),
    _reduce("reduce_sum_spatial", "ReduceSum", MAP, 13, axes=[-2, -1]),
    _reduce("reduce_sum_2d", "ReduceSum", VECTOR, 17, axes=[1]),
    _reduce("reduce_sum_noop", "ReduceSum", MAP, 17, noop_with_empty_axes=1),
    _reduce("reduce_max", "ReduceMax", MAP, 17, axes=[1, 3], keepdims=0),
    _reduce("reduce_max_18", "ReduceMax", MAP, 18, axes=[-1]),
    _reduce("reduce_max_2d", "ReduceMax", VECTOR, 17, axes=[1]),
    _reduce("reduce_min", "ReduceMin", (4, 6), 17, axes=[2], keepdims=0),
    _reduce("reduce_min_18", "ReduceMin", MAP, 18, axes=[1, 2]),
    _reduce("reduce_min_noop_18", "ReduceMin", MAP, 18, noop_with_empty_axes=1),
    _reduce("reduce_l2", "ReduceL2", MAP, 17, axes=[2, 3], keepdims=0),
    _reduce("reduce_l2_18", "ReduceL2", MAP, 18, axes=[1]),
    _reduce("reduce_l2_noop_18", "ReduceL2", MAP, 18, noop_with_empty_axes=1),
    _reduce("reduce_sum_square", "ReduceSumSquare", MAP, 17, axes=[1], keepdims=0),
    _reduce("reduce_sum_square_18", "ReduceSumSquare", MAP, 18, axes=[2, 3]),
    _reduce("reduce_sum_square_2d", "ReduceSumSquare", VECTOR, 17, axes=[1]),
    _reduce("reduce_sum_square_noop_18", "ReduceSumSquare", MAP, 18, noop_with_empty_axes=1),
    # ties (each maximum twice) split the gradient in halves, as central differences do
    Case(
        "reduce_max_tied",
        MAP,
        (node("Concat", ["x", "x"], "twice", axis=1), node("ReduceMax", ["twice"], axes=[1])),
    ),
    Case("global_max_pool", MAP, (node("GlobalMaxPool", ["x"]),)),
    Case(
        "global_max_pool_tied",
        MAP,
        (node("Concat", ["x", "x"], "twice", axis=3), node("GlobalMaxPool", ["twice"])),
    ),
    Case(
        "global_max_pool_1d",
        (4, 6),
        (node("GlobalMaxPool", ["x"]),),
        reference=(node("ReduceMax", ["x"], axes=[2]),),  # onnx.reference's reduces channels too
    ),
    # smooth unary ops
    Case("gelu_tanh", MAP, (node("Gelu", ["x"], approximate="tanh"),), scale=2.0, opset=20),
    Case("gelu_tanh_2d", VECTOR, (node("Gelu", ["x"], approximate="tanh"),), opset=20),
    Case("tanh", MAP, (node("Tanh", ["x"]),), scale=2.0),
    Case("tanh_2d", VECTOR, (node("Tanh", ["x"]),)),
    Case("exp", MAP, (node("Exp", ["x"]),)),
    Case("log", MAP, (*POSITIVE, node("Log", ["p"])), HALF),
    Case("sqrt", MAP, (*POSITIVE, node("Sqrt", ["p"])), HALF),
    Case("sqrt_2d", VECTOR, (*POSITIVE, node("Sqrt", ["p"])), HALF),
    Case("reciprocal", MAP, (*POSITIVE, node("Reciprocal", ["p"])), HALF),
    Case("neg", MAP, (node("Neg", ["x"]),)),
    Case("abs", MAP, (node("Abs", ["x"]),)),
    Case("abs_2d", VECTOR, (node("Abs", ["x"]),)),
    Case("softplus", MAP, (node("Softplus", ["x"]),), scale=2.0),
    Case("softsign", MAP, (node("Softsign", ["x"]),), scale=2.0),
    Case("softsign_2d", VECTOR, (node("Softsign", ["x"]),), scale=2.0),
    Case("mish", MAP, (node("Mish", ["x"]),), scale=2.0, opset=18),
    Case("mish_2d", VECTOR, (node("Mish", ["x"]),), scale=2.0, opset=18),
    Case("log_softmax", MAP, (node("LogSoftmax", ["x"]),)),
    Case("log_softmax_channels", MAP, (node("LogSoftmax", ["x"], axis=1),)),
    Case("log_softmax_2d", VECTOR, (node("LogSoftmax", ["x"], axis=1),)),
    # Pow: constant exponents (float, integer, per channel), input-dependent ones
    Case("pow_constant", MAP, (*POSITIVE, node("Pow", ["p", "e"])), {**HALF, "e": scalar(1.7)}),
    Case("pow_integer_negative_base", MAP, (node("Pow", ["x", "e"]),), {"e": ints(3)}),
    Case(
        "pow_per_channel",
        MAP,
        (*POSITIVE, node("Pow", ["p", "e"])),
        {**HALF, "e": w(3, 1, 1, scale=2.0)},
    ),
    Case(
        "pow_both_input_dependent",
        MAP,
        (*POSITIVE, node("Sigmoid", ["x"], "s"), node("Pow", ["p", "s"])),
        HALF,
    ),
    Case(
        "pow_exponent_input_dependent",
        MAP,
        (node("Pow", ["base", "x"]),),
        {"base": np.abs(w(3, 1, 1)) + 0.5},
    ),
    # ReLU-like activations
    Case("prelu", MAP, (node("PRelu", ["x", "slope"]),), {"slope": w(3, 1, 1)}),
    Case("prelu_scalar_slope", MAP, (node("PRelu", ["x", "slope"]),), {"slope": scalar(0.2)}),
    Case("prelu_2d", VECTOR, (node("PRelu", ["x", "slope"]),), {"slope": w(6)}),
    Case(
        "prelu_input_dependent_slope",
        MAP,
        (
            node("GlobalAveragePool", ["x"], "mean"),
            node("Sigmoid", ["mean"], "slope"),
            node("PRelu", ["x", "slope"]),
        ),
    ),
    Case("elu", MAP, (node("Elu", ["x"], alpha=0.5),)),
    Case("elu_2d", VECTOR, (node("Elu", ["x"]),)),
    Case("selu", MAP, (node("Selu", ["x"]),)),
    Case("selu_attributes", VECTOR, (node("Selu", ["x"], alpha=1.3, gamma=0.8),)),
    Case("celu", MAP, (node("Celu", ["x"], alpha=0.7),)),
    Case("celu_2d", VECTOR, (node("Celu", ["x"]),)),
    # variadic, broadcasting
    Case(
        "max_broadcast",
        MAP,
        (node("GlobalAveragePool", ["x"], "mean"), node("Max", ["x", "c", "mean"])),
        {"c": w(3, 1, 1)},
    ),
    Case("max_tied", MAP, (node("Max", ["x", "x"]),)),  # ties split: 1/2 + 1/2
    Case("max_single", VECTOR, (node("Max", ["x"]),)),
    Case(
        "min_constant_first",
        MAP,
        (node("Tanh", ["x"], "t"), node("Min", ["c", "x", "t"])),
        {"c": w(3, 1, 1)},
    ),
    Case("min_2d", VECTOR, (node("Sigmoid", ["x"], "s"), node("Min", ["x", "s"]))),
    Case(
        "sum_broadcast",
        MAP,
        (node("GlobalAveragePool", ["x"], "mean"), node("Sum", ["x", "mean", "c"])),
        {"c": w(3, 1, 1)},
    ),
    Case("sum_2d", VECTOR, (node("Sigmoid", ["x"], "s"), node("Sum", ["x", "s", "x"]))),
    Case(
        "mean_broadcast",
        MAP,
        (
            node("GlobalAveragePool", ["x"], "mean"),
            node("Sigmoid", ["x"], "s"),
            node("Mean", ["x", "s", "mean"]),
        ),
    ),
    # SiLU as exporters write it: one backward rule for the pair, either operand order
    Case("silu", MAP, (node("Sigmoid", ["x"], "s"), node("Mul", ["x", "s"]))),
    Case("silu_gate_first_2d", VECTOR, (node("Sigmoid", ["x"], "s"), node("Mul", ["s", "x"]))),
    Case(
        "silu_sigmoid_read_again",
        MAP,
        (
            node("Sigmoid", ["x"], "s"),
            node("Mul", ["x", "s"], "y"),
            node("Add", ["y", "s"]),
        ),
    ),
    # Where and Cast
    Case(
        "where",
        MAP,
        (
            node("Greater", ["x", "t"], "condition"),
            node("Mul", ["x", "three"], "big"),
            node("Sigmoid", ["x"], "s"),
            node("Where", ["condition", "big", "s"]),
        ),
        {"t": scalar(0.2), "three": scalar(3.0)},
    ),
    Case(
        "where_broadcast",
        MAP,
        (
            node("GlobalAveragePool", ["x"], "mean"),
            node("Greater", ["mean", "zero"], "condition"),
            node("Tanh", ["x"], "t"),
            node("Where", ["condition", "t", "mean"]),
        ),
        {"zero": scalar(0.0)},
    ),
    Case(
        "where_constant_value",
        VECTOR,
        (node("Less", ["x", "zero"], "condition"), node("Where", ["condition", "c", "x"])),
        {"zero": scalar(0.0), "c": w(6)},
    ),
    # (onnx.reference in float64 would round the cast's output to float32)
    Case(
        "cast_float32",
        MAP,
        (node("Cast", ["x"], to=TensorProto.FLOAT),),
        reference=(node("Identity", ["x"]),),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_input_gradient_matches_finite_differences(case: Case) -> None:
    check_input_gradient(case)


ONE_IMAGE = [
    "reduce_mean_18",
    "reduce_sum",
    "reduce_max",
    "reduce_l2",
    "global_max_pool",
    "gelu_tanh",
    "log_softmax_channels",
    "pow_both_input_dependent",
    "prelu_input_dependent_slope",
    "elu",
    "max_broadcast",
    "mean_broadcast",
    "where_broadcast",
]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ONE_IMAGE], ids=str)
def test_one_image_several_seeds(case: Case) -> None:
    """N = 1, M = 3: forward tensors broadcast against the gradients along the batch axis."""
    model = classifier(case)
    layer = case.nodes[0].output[0]
    x = _array(1, *case.shape, seed=3, scale=case.scale)
    seeds = _array(3, CLASSES, seed=4)
    outputs = run_gradients(model, GradientSpec("logits", layer=layer, wrt_input=True), x, seeds)
    assert outputs["grad_input"].shape == (3, *case.shape)
    assert_close(outputs["grad_layer"], numeric_gradient(model, x, seeds, layer))
    assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))


def _readout(model: onnx.ModelProto) -> npt.NDArray[np.float64]:
    weight = next(i for i in model.graph.initializer if i.name == "readout/w")
    return numpy_helper.to_array(weight).astype(np.float64)


@pytest.mark.parametrize(
    ("op_type", "relu_like"), [("Elu", True), ("PRelu", True), ("Tanh", False)]
)
def test_guided_filter_applies_at_relu_like_ops_only(op_type: str, relu_like: bool) -> None:
    """h = op(x) + 0 * relu(x): the Relu, whose gradient is 0, only makes guided runs valid."""
    inputs = ["x", "slope"] if op_type == "PRelu" else ["x"]
    nodes = (
        node(op_type, inputs, "a"),
        node("Relu", ["x"], "r"),
        node("Mul", ["r", "zero"], "off"),
        node("Add", ["a", "off"]),
    )
    weights = {"zero": scalar(0.0), **({"slope": w(6)} if op_type == "PRelu" else {})}
    model = classifier(Case(f"guided_{op_type}", VECTOR, nodes, weights))
    x = _array(BATCH, *VECTOR, seed=5)
    seeds = _array(BATCH, CLASSES, seed=6)
    guided = run_gradients(model, GradientSpec("logits", wrt_input=True, guided=True), x, seeds)
    plain = run_gradients(model, GradientSpec("logits", wrt_input=True), x, seeds)
    upstream = seeds.astype(np.float64) @ _readout(model)  # the gradient at h
    assert (upstream < 0).any()
    slope = plain["grad_input"] / upstream
    expected = (np.maximum(upstream, 0) if relu_like else upstream) * slope
    assert_close(guided["grad_input"], expected)


_erf = np.vectorize(math.erf, otypes=[np.float64])


@pytest.mark.parametrize(
    ("case", "function"),
    [
        (Case("erf", MAP, (node("Erf", ["x"]),)), _erf),
        (Case("erf_2d", VECTOR, (node("Erf", ["x"]),), scale=2.0), _erf),
        (
            Case("gelu", MAP, (node("Gelu", ["x"]),), scale=2.0, opset=20),
            lambda x: x * (1 + _erf(x / math.sqrt(2))) / 2,
        ),
        (
            Case("gelu_2d", VECTOR, (node("Gelu", ["x"], approximate="none"),), opset=20),
            lambda x: x * (1 + _erf(x / math.sqrt(2))) / 2,
        ),
    ],
    ids=str,
)
def test_erf_gradients_match_finite_differences(case: Case, function: Callable[[Any], Any]) -> None:
    """onnx.reference computes Erf in float32, so the differences are of math.erf, one element
    at a time (the op is elementwise), times the read-out's gradient."""
    model = classifier(case)
    x = _array(BATCH, *case.shape, seed=7, scale=case.scale)
    seeds = _array(BATCH, CLASSES, seed=8)
    outputs = run_gradients(model, GradientSpec("logits", wrt_input=True), x, seeds)
    wide = x.astype(np.float64)
    slope = (function(wide + STEP) - function(wide - STEP)) / (2 * STEP)
    upstream = (seeds.astype(np.float64) @ _readout(model)).reshape(x.shape)
    assert_close(outputs["grad_input"], upstream * slope)


def test_a_cast_to_an_integer_is_not_differentiated() -> None:
    """h = x + float(int(3x)): the integer branch is piecewise constant and carries nothing."""
    case = Case(
        "cast_int",
        MAP,
        (
            node("Mul", ["x", "three"], "big"),
            node("Cast", ["big"], "whole", to=TensorProto.INT64),
            node("Cast", ["whole"], "back", to=TensorProto.FLOAT),
            node("Add", ["x", "back"]),
        ),
        {"three": scalar(3.0)},
    )
    model = classifier(case)
    x = _array(BATCH, *MAP, seed=7)
    assert np.abs(3 * x - np.round(3 * x)).min() > 1e-3  # no step is crossed by the differences
    seeds = _array(BATCH, CLASSES, seed=8)
    gradient_model = build_gradient_model(model, GradientSpec("logits", wrt_input=True))
    backward = [n for n in gradient_model.graph.node if n.name.startswith("grad/")]
    assert not any(n.op_type == "Cast" for n in backward)
    outputs = run_gradients(model, GradientSpec("logits", wrt_input=True), x, seeds)
    assert_close(
        outputs["grad_input"], (seeds.astype(np.float64) @ _readout(model)).reshape(x.shape)
    )


def test_a_double_cast_round_trip() -> None:
    case = Case(
        "cast_double",
        MAP,
        (
            node("Cast", ["x"], "wide", to=TensorProto.DOUBLE),
            node("Exp", ["wide"], "grown"),
            node("Cast", ["grown"], to=TensorProto.FLOAT),
        ),
        reference=(node("Exp", ["x"]),),
    )
    model = classifier(case)
    spec = GradientSpec("logits", wrt_input=True)
    try:
        build_gradient_model(model, spec)
    except UnsupportedModel as exc:
        if "is not float32" not in str(exc):
            raise
        pytest.skip("the autodiff refuses non-float32 tensors on the path")
    x = _array(BATCH, *MAP, seed=7)
    seeds = _array(BATCH, CLASSES, seed=8)
    outputs = run_gradients(model, spec, x, seeds)
    assert_close(
        outputs["grad_input"], numeric_gradient(classifier(case.for_reference()), x, seeds)
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        (_reduce("over_batch", "ReduceSum", MAP, 17, axes=[0, 1]), "batch axis"),
        (_reduce("over_batch_18", "ReduceMax", MAP, 18, axes=[-4]), "batch axis"),
        (_reduce("all_axes", "ReduceMean", MAP, 17), "every axis"),
        (_reduce("all_axes_18", "ReduceL2", MAP, 18), "every axis"),
        (Case("log_softmax_batch", VECTOR, (node("LogSoftmax", ["x"], axis=0),)), "batch axis"),
    ],
    ids=str,
)
def test_reductions_over_the_batch_are_refused(case: Case, reason: str) -> None:
    with pytest.raises(UnsupportedModel, match=reason):
        build_gradient_model(classifier(case), GradientSpec("logits", wrt_input=True))


def test_supported_ops_include_the_pointwise_ones() -> None:
    ops = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare"}
    ops |= {"Erf", "Gelu", "Tanh", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs"}
    ops |= {"Max", "Min", "Sum", "Mean", "PRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign"}
    ops |= {"Mish", "LogSoftmax", "Cast", "Where", "GlobalMaxPool"}
    assert ops <= set(supported_ops())
