"""Gradient graphs (engines.graphs) against finite differences, numpy and closed forms.

Every op case is a tiny graph `x -> op(s) -> h` followed by a fixed random read-out
(Flatten + Gemm) to `logits`. Gradients come from onnxruntime running the gradient model in
float32; the reference is a central difference of the same graph in float64 with
onnx.reference, all perturbations evaluated as one batch. Inputs are random normals, which stay
far (relative to the step) from the kinks of ReLU, Clip and MaxPool with overwhelming odds.
"""

import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from engines.errors import InvalidParameters, UnsupportedModel
from engines.graphs import GradientSpec, build_gradient_model, supported_ops
from engines.graphs.prepared import add_top_k_seeds

Array = npt.NDArray[Any]

OPSET = 17
CLASSES = 4
STEP = 1e-5
BATCH = 2


def _array(*shape: int, seed: int = 0, scale: float = 1.0) -> Array:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


@dataclass(frozen=True)
class Case:
    """A graph from input `x` (per-sample shape `shape`) to a tensor `h`."""

    name: str
    shape: tuple[int, ...]
    nodes: tuple[onnx.NodeProto, ...]
    weights: dict[str, Array] = field(default_factory=dict)
    scale: float = 1.0
    reference: tuple[onnx.NodeProto, ...] = ()  # equal nodes for onnx.reference, if it lacks one
    opset: int = OPSET

    def for_reference(self) -> "Case":
        if not self.reference:
            return self
        return Case(
            self.name, self.shape, self.reference, self.weights, self.scale, opset=self.opset
        )

    def __str__(self) -> str:
        return self.name


def node(op_type: str, inputs: Sequence[str], output: str = "h", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op_type, list(inputs), [output], name=f"{output}/{op_type}", **attrs)


def classifier(case: Case) -> onnx.ModelProto:
    """The case's graph with a random linear read-out of `h` to `logits` [N, CLASSES]."""
    inits = [numpy_helper.from_array(v, k) for k, v in case.weights.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *case.shape])
    head = helper.make_model(
        helper.make_graph(list(case.nodes), "head", [x], [onnx.ValueInfoProto(name="h")], inits),
        opset_imports=[helper.make_opsetid("", case.opset)],
    )
    inferred = onnx.shape_inference.infer_shapes(head, strict_mode=True)
    dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim[1:]]
    features = int(np.prod(dims))
    seed = zlib.crc32(case.name.encode())
    readout = {
        "readout/w": _array(CLASSES, features, seed=seed, scale=features**-0.5),
        "readout/b": _array(CLASSES, seed=seed + 1),
    }
    nodes = [
        *case.nodes,
        node("Flatten", ["h"], "flat"),
        node("Gemm", ["flat", "readout/w", "readout/b"], "logits", transB=1),
    ]
    inits += [numpy_helper.from_array(v, k) for k, v in readout.items()]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])
    graph = helper.make_graph(nodes, case.name, [x], [logits], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8 if case.opset <= 17 else 9 if case.opset <= 20 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


# --- references ------------------------------------------------------------------------------


def _to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(init).astype(np.float64)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array, init.name))
    return result


def _with_probe(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """A copy whose consumers of `tensor` read `tensor + probe`, `probe` being a new input."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    shape = next(v for v in values if v.name == tensor).type.tensor_type.shape
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph, probed = result.graph, f"{tensor}+probe"
    for each in graph.node:
        for i, name in enumerate(each.input):
            if name == tensor:
                each.input[i] = probed
    produced_at = [i for i, n in enumerate(graph.node) if tensor in n.output]
    position = produced_at[0] + 1 if produced_at else 0
    graph.node.insert(position, helper.make_node("Add", [tensor, "probe"], [probed]))
    probe = helper.make_tensor_value_info("probe", TensorProto.FLOAT, None)
    probe.type.tensor_type.shape.CopyFrom(shape)
    graph.input.append(probe)
    return result


def numeric_gradient(model: onnx.ModelProto, x: Array, seeds: Array, tensor: str = "x") -> Array:
    """Central differences of sum_j seeds[m, j] * logits[n, j] w.r.t. `tensor`, in float64.

    n = m when the batch equals the number of seeds, else n = 0 (one image, several seeds).
    Every perturbation of every sample is one row of a single batch.
    """
    shape = tensor_value(model, tensor, x).shape[1:]
    size = int(np.prod(shape))
    steps = np.eye(size).reshape(size, *shape) * STEP
    steps = np.concatenate([steps, -steps])
    batch = x.shape[0]
    feeds = {
        "x": np.repeat(x.astype(np.float64), 2 * size, axis=0),
        "probe": np.tile(steps, (batch,) + (1,) * len(shape)),
    }
    logits = _evaluate(_with_probe(model, tensor), "logits", feeds).reshape(batch, 2, size, -1)
    slopes = (logits[:, 0] - logits[:, 1]) / (2 * STEP)  # [N, size, classes]
    rows = [m if batch == len(seeds) else 0 for m in range(len(seeds))]
    grads = [slopes[row] @ seed for row, seed in zip(rows, seeds.astype(np.float64), strict=True)]
    return np.stack(grads).reshape(len(seeds), *shape)


def tensor_value(model: onnx.ModelProto, tensor: str, x: Array) -> Array:
    """A tensor of the graph, evaluated in float64 by onnx.reference."""
    if tensor == "x":
        return x.astype(np.float64)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return _evaluate(exposed, tensor, {"x": x.astype(np.float64)})


def _evaluate(model: onnx.ModelProto, output: str, feeds: dict[str, Array]) -> Array:
    results: Any = ReferenceEvaluator(_to_float64(model)).run([output], feeds)
    return np.asarray(results[0])


def run_gradients(
    model: onnx.ModelProto, spec: GradientSpec, x: Array, seeds: Array
) -> dict[str, Array]:
    gradient_model = build_gradient_model(model, spec)
    onnx.checker.check_model(gradient_model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        gradient_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x, "seed": seeds}), strict=True))


def assert_close(actual: Array, expected: Array) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale)


# --- one case per op and attribute variant ---------------------------------------------------


def w(*shape: int, seed: int = 1, scale: float = 0.5) -> Array:
    return _array(*shape, seed=seed, scale=scale)


def scalar(value: float) -> Array:
    return np.array(value, np.float32)


def ints(*values: int) -> Array:
    return np.array(values, np.int64)


IMAGE = (3, 7, 7)
CONV = {"conv/w": w(4, 3, 3, 3)}
RELU6 = {"lo": scalar(0.0), "hi": scalar(6.0)}

MAX_POOL_CASES = [
    Case("max_pool_2x2", (3, 6, 6), (node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2]),)),
    Case(
        "max_pool_overlapping",
        IMAGE,
        (node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),),
    ),
    Case(
        "max_pool_ceil",
        (3, 6, 6),
        (node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),),
    ),
    # stride 1: routed along rows, then along columns (2k taps instead of k*k)
    Case(
        "max_pool_3x3_stride1_padded",
        IMAGE,
        (node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),),
    ),
    Case(
        "max_pool_5x5_stride1",
        (2, 8, 7),
        (node("MaxPool", ["x"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),),
    ),
    Case(
        "max_pool_with_indices",
        IMAGE,
        (helper.make_node("MaxPool", ["x"], ["h", "idx"], kernel_shape=[3, 3], strides=[1, 1]),),
    ),
]

# Strided kernels of at least stride + 2 go by phases: a stride-1 Conv, then Col2Im (from
# opset 18) or DepthToSpace to interleave them.
PHASE_CASES = [
    Case(
        "conv_7x7_stride2_phases",
        (3, 15, 14),
        (node("Conv", ["x", "k7/w", "k7/b"], strides=[2, 2], pads=[3, 3, 3, 3]),),
        {"k7/w": w(5, 3, 7, 7, scale=0.2), "k7/b": w(5)},
    ),
    Case(
        "conv_5x4_stride2_asymmetric_pads_phases",
        (2, 11, 12),
        (node("Conv", ["x", "k54/w"], strides=[2, 2], pads=[1, 2, 2, 0]),),
        {"k54/w": w(4, 2, 5, 4, scale=0.3)},
    ),
    Case(
        "conv_5x5_stride3_phases",
        (2, 13, 14),
        (node("Conv", ["x", "k5/w"], strides=[3, 3], pads=[2, 2, 1, 0]),),
        {"k5/w": w(3, 2, 5, 5, scale=0.3)},
    ),
    Case(
        "conv_same_upper_7x7_phases",
        (3, 9, 10),
        (node("Conv", ["x", "k7/w"], strides=[2, 2], auto_pad="SAME_UPPER"),),
        {"k7/w": w(5, 3, 7, 7, scale=0.2)},
    ),
]

# Strided grouped kernels spread the gradient out with zeros: by Col2Im from opset 18, by a
# single-channel ConvTranspose before.
SPREAD_CASES = [
    Case(
        "conv_depthwise_stride2",
        (4, 7, 7),
        (node("Conv", ["x", "dw/w"], group=4, strides=[2, 2], pads=[1, 1, 1, 1]),),
        {"dw/w": w(4, 1, 3, 3)},
    ),
    Case(
        "conv_depthwise_5x5_stride2_uneven_pads",
        (4, 8, 8),
        (node("Conv", ["x", "dw/w"], group=4, strides=[2, 2], pads=[1, 1, 2, 2]),),
        {"dw/w": w(4, 1, 5, 5)},
    ),
    Case(
        "conv_depthwise_stride2_unpadded_even",
        (4, 8, 6),
        (node("Conv", ["x", "dw/w"], group=4, strides=[2, 2]),),
        {"dw/w": w(4, 1, 3, 3)},
    ),
    Case(
        "conv_depthwise_multiplier2_stride2",
        (4, 7, 7),
        (node("Conv", ["x", "dw/w"], group=4, strides=[2, 2], pads=[1, 1, 1, 1]),),
        {"dw/w": w(8, 1, 3, 3)},
    ),
    Case(
        "conv_depthwise_5x5_strides_3_2",
        (4, 8, 9),
        (node("Conv", ["x", "dw/w"], group=4, strides=[3, 2], pads=[2, 1, 2, 2]),),
        {"dw/w": w(4, 1, 5, 5)},
    ),
]

CASES = [
    # Conv: pads, strides with a remainder, groups, dilations, auto_pad, 1-D, computed kernels
    Case(
        "conv",
        IMAGE,
        (node("Conv", ["x", "conv/w", "conv/b"], pads=[1, 1, 1, 1]),),
        {**CONV, "conv/b": w(4)},
    ),
    Case(
        "conv_stride2_asymmetric_pads",
        IMAGE,
        (node("Conv", ["x", "conv/w"], strides=[2, 2], pads=[0, 1, 1, 0]),),
        CONV,
    ),
    Case(
        "conv_groups_dilation",
        (4, 8, 8),
        (node("Conv", ["x", "g/w"], group=2, dilations=[2, 2], pads=[2, 1, 2, 1]),),
        {"g/w": w(6, 2, 3, 3)},
    ),
    *SPREAD_CASES,
    Case(
        "conv_same_upper",
        IMAGE,
        (node("Conv", ["x", "conv/w"], strides=[2, 2], auto_pad="SAME_UPPER"),),
        CONV,
    ),
    Case(
        "conv_same_lower_even_kernel",
        IMAGE,
        (node("Conv", ["x", "k4/w"], strides=[2, 2], auto_pad="SAME_LOWER"),),
        {"k4/w": w(2, 3, 4, 4)},
    ),
    Case(
        "conv_valid",
        IMAGE,
        (node("Conv", ["x", "k2/w"], strides=[2, 2], auto_pad="VALID"),),
        {"k2/w": w(2, 3, 2, 2)},
    ),
    Case(
        "conv_pads_wider_than_kernel",
        IMAGE,
        (node("Conv", ["x", "k1/w"], pads=[2, 0, 0, 2]),),
        {"k1/w": w(2, 3, 1, 1)},
    ),
    *PHASE_CASES,
    Case(
        "conv_1x1_stride2",
        IMAGE,
        (node("Conv", ["x", "k1/w"], strides=[2, 2]),),
        {"k1/w": w(5, 3, 1, 1)},
    ),
    Case(
        "conv_computed_kernel",
        (4, 7, 7),
        (
            node("Identity", ["k/w"], "kernel"),
            node("Conv", ["x", "kernel"], group=2, strides=[2, 2], pads=[1, 0, 1, 1]),
        ),
        {"k/w": w(4, 2, 3, 3)},
    ),
    Case(
        "conv_1d",
        (3, 9),
        (node("Conv", ["x", "c1/w"], strides=[2], pads=[1, 0]),),
        {"c1/w": w(4, 3, 3)},
    ),
    # ConvTranspose
    Case(
        "conv_transpose_stride2",
        (4, 4, 4),
        (
            node(
                "ConvTranspose",
                ["x", "t/w", "t/b"],
                strides=[2, 2],
                pads=[1, 1, 0, 0],
                output_padding=[1, 0],
            ),
        ),
        {"t/w": w(4, 3, 3, 3), "t/b": w(3)},
    ),
    # (onnx.reference's grouped ConvTranspose is broken, so groups are not checked here)
    Case(
        "conv_transpose_dilation",
        (4, 4, 4),
        (node("ConvTranspose", ["x", "t/w"], dilations=[2, 2], pads=[0, 1, 1, 0]),),
        {"t/w": w(4, 2, 3, 3)},
    ),
    # Gemm and MatMul
    Case(
        "gemm_transb_alpha_beta",
        (6,),
        (node("Gemm", ["x", "m/w", "m/b"], transB=1, alpha=0.7, beta=1.3),),
        {"m/w": w(5, 6), "m/b": w(5)},
    ),
    Case("gemm_plain", (6,), (node("Gemm", ["x", "m/w"]),), {"m/w": w(6, 5)}),
    Case(
        "gemm_input_dependent_bias",
        (6,),
        (
            node("Gemm", ["x", "v/w"], "v"),
            node("Sigmoid", ["v"], "c"),
            node("Gemm", ["x", "m/w", "c"], beta=0.5),
        ),
        {"v/w": w(6, 5, seed=2), "m/w": w(6, 5)},
    ),
    Case("matmul_2d", (6,), (node("MatMul", ["x", "m/w"]),), {"m/w": w(6, 5)}),
    Case("matmul_3d", (4, 3), (node("MatMul", ["x", "m/w"]),), {"m/w": w(3, 5)}),
    Case("matmul_vector", (4, 3), (node("MatMul", ["x", "v"]),), {"v": w(3)}),
    Case(
        "matmul_both_operands",
        (4, 3),
        (node("Transpose", ["x"], "xt", perm=[0, 2, 1]), node("MatMul", ["x", "xt"])),
    ),
    # activations on feature maps (4-D) and on vectors (2-D)
    Case("relu", IMAGE, (node("Relu", ["x"]),)),
    Case("clip_relu6", IMAGE, (node("Clip", ["x", "lo", "hi"]),), RELU6, scale=4.0),
    Case("clip_max_only", IMAGE, (node("Clip", ["x", "", "hi"]),), RELU6, scale=4.0),
    Case("clip_min_only", IMAGE, (node("Clip", ["x", "lo"]),), {"lo": scalar(-0.5)}),
    Case("clip_no_bounds", IMAGE, (node("Clip", ["x"]),)),
    Case(
        "clip_computed_bounds",
        IMAGE,
        (node("Identity", ["lo"], "low"), node("Clip", ["x", "low", "hi"])),
        RELU6,
        scale=4.0,
    ),
    Case("clip_relu6_2d", (6,), (node("Clip", ["x", "lo", "hi"]),), RELU6, scale=4.0),
    Case("leaky_relu", IMAGE, (node("LeakyRelu", ["x"], alpha=0.1),)),
    Case("leaky_relu_steep", IMAGE, (node("LeakyRelu", ["x"], alpha=2.0),)),
    Case("leaky_relu_2d", (6,), (node("LeakyRelu", ["x"]),)),
    Case("sigmoid", IMAGE, (node("Sigmoid", ["x"]),), scale=2.0),
    Case("sigmoid_2d", (6,), (node("Sigmoid", ["x"]),), scale=2.0),
    Case("hard_sigmoid", IMAGE, (node("HardSigmoid", ["x"]),), scale=4.0),
    Case(
        "hard_sigmoid_alpha_beta",
        IMAGE,
        (node("HardSigmoid", ["x"], alpha=0.5, beta=0.3),),
        scale=2.0,
    ),
    Case("hard_sigmoid_negative_alpha", (6,), (node("HardSigmoid", ["x"], alpha=-0.4),), scale=3.0),
    Case("hard_swish", IMAGE, (node("HardSwish", ["x"]),), scale=4.0),
    Case("hard_swish_2d", (8,), (node("HardSwish", ["x"]),), scale=4.0),
    Case("softmax_last_axis", IMAGE, (node("Softmax", ["x"]),)),
    Case("softmax_2d", (6,), (node("Softmax", ["x"], axis=1),)),
    Case("dropout", IMAGE, (node("Dropout", ["x", "ratio"]),), {"ratio": scalar(0.3)}),
    Case("identity", IMAGE, (node("Identity", ["x"]),)),
    # broadcasting arithmetic; both operands depend on the input
    Case(
        "mul_broadcast_spatial",
        IMAGE,
        (node("GlobalAveragePool", ["x"], "mean"), node("Mul", ["x", "mean"])),
    ),
    Case(
        "add_broadcast_channels",
        IMAGE,
        (node("Conv", ["x", "one/w"], "one"), node("Add", ["x", "one"])),
        {"one/w": w(1, 3, 1, 1)},
    ),
    Case(
        "sub_broadcast_first",
        IMAGE,
        (node("GlobalAveragePool", ["x"], "mean"), node("Sub", ["mean", "x"])),
    ),
    Case(
        "div_broadcast",
        IMAGE,
        (
            node("GlobalAveragePool", ["x"], "mean"),
            node("Sigmoid", ["mean"], "gate"),
            node("Add", ["gate", "half"], "positive"),
            node("Div", ["x", "positive"]),
        ),
        {"half": scalar(0.5)},
    ),
    Case(
        "div_constant_numerator",
        IMAGE,
        (
            node("Sigmoid", ["x"], "gate"),
            node("Add", ["gate", "half"], "positive"),
            node("Div", ["num", "positive"]),
        ),
        {"half": scalar(0.5), "num": w(3, 1, 1)},
    ),
    Case("mul_constant", IMAGE, (node("Mul", ["x", "s"]),), {"s": w(3, 1, 1)}),
    Case("mul_square", IMAGE, (node("Mul", ["x", "x"]),)),
    # normalisation and pooling
    Case(
        "batch_norm",
        IMAGE,
        (node("BatchNormalization", ["x", "bn/s", "bn/b", "bn/m", "bn/v"], epsilon=1e-3),),
        {
            "bn/s": w(3),
            "bn/b": w(3, seed=2),
            "bn/m": w(3, seed=3),
            "bn/v": np.abs(w(3, seed=4)) + 0.5,
        },
    ),
    *MAX_POOL_CASES,
    Case(
        "average_pool_include_pad",
        IMAGE,
        (
            node(
                "AveragePool",
                ["x"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=1,
            ),
        ),
    ),
    Case(
        "average_pool_exclude_pad",
        IMAGE,
        (node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),),
    ),
    Case(
        "average_pool_asymmetric",
        IMAGE,
        (node("AveragePool", ["x"], kernel_shape=[2, 3], strides=[2, 1], pads=[0, 1, 1, 1]),),
    ),
    Case(
        "average_pool_ceil",
        (3, 6, 6),
        (node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),),
    ),
    # from opset 18 MaxPool's gradient takes the windows' taps and Col2Im instead of Indices,
    # and strided Convs' gradients are interleaved or spread out by Col2Im
    *(
        Case(f"{case.name}_opset18", case.shape, case.nodes, case.weights, opset=18)
        for case in (*MAX_POOL_CASES, *PHASE_CASES, *SPREAD_CASES)
    ),
    Case(
        "max_pool_dilated_asymmetric_opset18",
        (3, 9, 8),
        (
            node(
                "MaxPool",
                ["x"],
                kernel_shape=[2, 3],
                strides=[2, 1],
                dilations=[2, 1],
                pads=[1, 0, 0, 2],
            ),
        ),
        opset=18,
    ),
    Case("global_average_pool", IMAGE, (node("GlobalAveragePool", ["x"]),)),
    # shape ops
    Case("flatten", IMAGE, (node("Flatten", ["x"], axis=-3),)),
    Case("reshape", IMAGE, (node("Reshape", ["x", "shape"]),), {"shape": ints(0, 21, -1)}),
    Case("transpose", IMAGE, (node("Transpose", ["x"], perm=[0, 2, 3, 1]),)),
    Case(
        "concat_channels",
        IMAGE,
        (node("Conv", ["x", "two/w"], "two"), node("Concat", ["two", "x"], axis=1)),
        {"two/w": w(2, 3, 1, 1)},
    ),
    Case(
        "concat_last_axis", IMAGE, (node("Relu", ["x"], "r"), node("Concat", ["x", "r"], axis=-1))
    ),
    Case(
        "pad",
        IMAGE,
        (node("Pad", ["x", "pads", "value"]),),
        {"pads": ints(0, 0, 1, 2, 0, 0, 2, 1), "value": scalar(0.5)},
    ),
    Case(
        "pad_negative",
        IMAGE,
        (node("Pad", ["x", "pads"]),),
        {
            "pads": ints(0, 0, -1, 1, 0, 0, 1, -2),
            "starts": ints(1, 0),
            "ends": ints(7, 5),
            "axes": ints(2, 3),
            "pads2": ints(0, 0, 0, 1, 0, 0, 1, 0),
        },
        reference=(
            node("Slice", ["x", "starts", "ends", "axes"], "cut"),
            node("Pad", ["cut", "pads2"]),
        ),
    ),
    # TResNet's anti-aliasing blur pads by reflection; edge and wrap copy borders too.
    *(
        Case(
            f"pad_{mode}",
            IMAGE,
            (node("Pad", ["x", "pads"], mode=mode),),
            {"pads": ints(0, 0, 1, 2, 0, 0, 2, 1)},
        )
        for mode in ("reflect", "edge", "wrap")
    ),
    Case(
        "pad_reflect_axes",
        IMAGE,
        (node("Pad", ["x", "pads", "", "axes"], mode="reflect"),),
        {"pads": ints(2, 1), "axes": ints(-1)},
        opset=19,
    ),
    Case("squeeze", (3, 1, 5), (node("Squeeze", ["x", "axes"]),), {"axes": ints(2)}),
    Case("unsqueeze", IMAGE, (node("Unsqueeze", ["x", "axes"]),), {"axes": ints(2)}),
]


def check_input_gradient(case: Case) -> None:
    """The gradient graph's input gradient equals central differences of the case's graph."""
    model = classifier(case)
    x = _array(BATCH, *case.shape, seed=7, scale=case.scale)
    seeds = _array(BATCH, CLASSES, seed=8)
    outputs = run_gradients(model, GradientSpec("logits", wrt_input=True), x, seeds)
    assert list(outputs) == ["logits", "grad_input"]
    assert outputs["grad_input"].shape == x.shape
    expected = numeric_gradient(classifier(case.for_reference()), x, seeds)
    assert_close(outputs["grad_input"], expected)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_input_gradient_matches_finite_differences(case: Case) -> None:
    check_input_gradient(case)


# --- layer gradients, seeds and batches -------------------------------------------------------

NETWORK = Case(
    "network",
    (3, 6, 6),
    (
        node("Conv", ["x", "c1/w", "c1/b"], "c1", pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], "mid"),
        node("Conv", ["mid", "c2/w", "c2/b"], "c2", pads=[1, 1, 1, 1], group=2),
        node("Add", ["c2", "mid"], "res"),
        node("Clip", ["res", "lo", "hi"], "act"),
        node("GlobalAveragePool", ["act"], "gate"),
        node("Mul", ["act", "gate"], "scaled"),
        node("MaxPool", ["scaled"], "h", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ),
    # (a bias after the ReLU keeps Clip's input off its kink where a whole window was cut)
    {
        "c1/w": w(4, 3, 3, 3),
        "c1/b": w(4, seed=2),
        "c2/w": w(4, 2, 3, 3, seed=3),
        "c2/b": w(4, seed=4),
        "lo": scalar(0.0),
        "hi": scalar(1.5),
    },
)


@pytest.mark.parametrize("wrt_input", [False, True])
def test_layer_gradient_matches_finite_differences(wrt_input: bool) -> None:
    model = classifier(NETWORK)
    x = _array(BATCH, *NETWORK.shape, seed=7)
    seeds = _array(BATCH, CLASSES, seed=8)
    spec = GradientSpec("logits", layer="mid", wrt_input=wrt_input)
    outputs = run_gradients(model, spec, x, seeds)
    expected_names = ["logits", "activation", "grad_layer"] + (["grad_input"] if wrt_input else [])
    assert list(outputs) == expected_names
    assert_close(outputs["activation"], tensor_value(model, "mid", x))
    assert_close(outputs["grad_layer"], numeric_gradient(model, x, seeds, "mid"))
    if wrt_input:
        assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))


@pytest.mark.parametrize(
    "spec",
    [
        GradientSpec("logits", layer="mid"),
        GradientSpec("logits", layer="act", wrt_input=True),
        GradientSpec("logits", wrt_input=True, guided=True),
    ],
    ids=["layer", "layer_and_input", "guided_input"],
)
def test_several_seeds_for_one_image_equal_separate_runs(spec: GradientSpec) -> None:
    model = classifier(NETWORK)
    x = _array(1, *NETWORK.shape, seed=7)
    seeds = _array(3, CLASSES, seed=9)
    together = run_gradients(model, spec, x, seeds)
    names = [n for n in ("grad_layer", "grad_input") if n in together]
    for m in range(3):
        alone = run_gradients(model, spec, x, seeds[m : m + 1])
        np.testing.assert_allclose(together["logits"], alone["logits"], rtol=1e-6)
        for name in names:
            assert together[name].shape[0] == 3
            np.testing.assert_allclose(together[name][m], alone[name][0], rtol=1e-5, atol=1e-6)


def test_several_seeds_for_one_image_match_finite_differences() -> None:
    case = Case(
        "broadcasting",
        (4, 3),
        (
            node("Transpose", ["x"], "xt", perm=[0, 2, 1]),
            node("MatMul", ["x", "xt"], "gram"),
            node("Softmax", ["gram"], "attention"),
            node("MatMul", ["attention", "x"], "mixed"),
            node("Unsqueeze", ["mixed", "axis"], "image"),
            node("MaxPool", ["image"], "h", kernel_shape=[2, 2], strides=[1, 1]),
        ),
        {"axis": ints(1)},
    )
    model = classifier(case)
    x = _array(1, *case.shape, seed=3)
    seeds = _array(3, CLASSES, seed=4)
    spec = GradientSpec("logits", wrt_input=True)
    outputs = run_gradients(model, spec, x, seeds)
    assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))


def test_paired_seeds_match_finite_differences_and_the_unpaired_graph() -> None:
    model = classifier(NETWORK)
    x = _array(BATCH, *NETWORK.shape, seed=11)
    seeds = _array(BATCH, CLASSES, seed=12)
    paired_spec = GradientSpec("logits", layer="mid", wrt_input=True, paired=True)
    paired = run_gradients(model, paired_spec, x, seeds)
    plain = run_gradients(model, GradientSpec("logits", layer="mid", wrt_input=True), x, seeds)
    assert_close(paired["grad_input"], numeric_gradient(model, x, seeds))
    for name in ("logits", "activation", "grad_layer", "grad_input"):
        np.testing.assert_allclose(paired[name], plain[name], rtol=1e-6, atol=1e-7)


def test_paired_graph_gives_the_seed_the_input_batch_dimension() -> None:
    model = classifier(NETWORK)
    graph = build_gradient_model(model, GradientSpec("logits", wrt_input=True, paired=True)).graph
    dims = {i.name: i.type.tensor_type.shape.dim[0] for i in graph.input}
    assert dims["seed"] == dims["x"]
    unpaired = build_gradient_model(model, GradientSpec("logits", wrt_input=True)).graph
    dims = {i.name: i.type.tensor_type.shape.dim[0] for i in unpaired.input}
    assert dims["seed"] != dims["x"]


def test_untiled_seeds_may_be_computed_from_the_output() -> None:
    """The seed can be replaced by a function of the scores (in-graph top-k)."""
    model = classifier(NETWORK)
    x = _array(1, *NETWORK.shape, seed=7)
    spec = GradientSpec("logits", layer="mid", wrt_input=True)
    gradient_model = build_gradient_model(model, spec)
    graph = gradient_model.graph
    kept = [i for i in graph.input if i.name != "seed"]
    del graph.input[:]
    graph.input.extend(kept)
    producer = next(i for i, n in enumerate(graph.node) if "logits" in n.output)
    graph.node.insert(producer + 1, node("Softmax", ["logits"], "seed"))
    onnx.checker.check_model(gradient_model, full_check=True)
    session = ort.InferenceSession(
        gradient_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    logits, _, grad_layer, grad_input = session.run(None, {"x": x})
    seeds = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = run_gradients(model, spec, x, seeds.astype(np.float32))
    assert_close(grad_layer, expected["grad_layer"])
    assert_close(grad_input, expected["grad_input"])


def _top_k_matches_one_hot_seeds(model: onnx.ModelProto) -> onnx.GraphProto:
    """Run the in-graph top-2 seeds of one image against explicit one-hot seeds."""
    spec = GradientSpec("logits", layer="mid", wrt_input=True)
    top_k = add_top_k_seeds(build_gradient_model(model, spec), "logits", CLASSES)
    onnx.checker.check_model(top_k, full_check=True)
    session = ort.InferenceSession(top_k.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _array(1, *NETWORK.shape, seed=21)
    _, _, grad_layer, grad_input, targets = session.run(None, {"x": x, "top_k": np.array([2])})
    assert len(targets) == 2
    expected = run_gradients(model, spec, x, np.eye(CLASSES, dtype=np.float32)[targets])
    assert_close(grad_layer, expected["grad_layer"])
    assert_close(grad_input, expected["grad_input"])
    return top_k.graph


@pytest.mark.parametrize("head", ["gemm", "gemm_features_first", "matmul"])
def test_top_k_seeds_read_rows_of_the_head_weights(head: str) -> None:
    """A Gemm or MatMul head's backward with one-hot seeds is a Gather of the targets' weights."""
    model = classifier(NETWORK)
    graph = model.graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    weight = next(i for i in graph.initializer if i.name == gemm.input[1])
    if head != "gemm":  # the same head with W stored [features, classes]
        transposed = numpy_helper.to_array(weight).T.copy()
        weight.CopyFrom(numpy_helper.from_array(transposed, weight.name))
        del gemm.attribute[:]
    if head == "matmul":
        at = list(graph.node).index(gemm)
        graph.node.remove(gemm)
        graph.node.insert(at, node("MatMul", ["flat", "readout/w"], "scores"))
        graph.node.insert(at + 1, node("Add", ["scores", "readout/b"], "logits"))
    graph = _top_k_matches_one_hot_seeds(model)
    assert not any("seed" in n.input for n in graph.node)
    assert not any(n.op_type == "OneHot" for n in graph.node)
    gathers = [n for n in graph.node if n.op_type == "Gather"]
    assert [n.input[0] for n in gathers] == ["readout/w"]
    assert gathers[0].attribute[0].i == (0 if head == "gemm" else 1)  # the classes axis
    forward = "MatMul" if head == "matmul" else "Gemm"  # and no backward product, no Transpose
    assert [n.op_type for n in graph.node if "readout/w" in n.input] == [forward, "Gather"]


def test_top_k_seeds_behind_a_softmax_stay_one_hot() -> None:
    model = classifier(NETWORK)
    model.graph.node[-1].output[0] = "scores"
    model.graph.node.append(node("Softmax", ["scores"], "logits"))
    graph = _top_k_matches_one_hot_seeds(model)
    assert any(n.op_type == "OneHot" for n in graph.node)
    assert not any(n.op_type == "Gather" for n in graph.node)


RELU6_CHAIN = Case(
    "relu6_chain",
    (3, 6, 6),
    (
        node("Conv", ["x", "c1/w", "c1/b"], "c1", pads=[1, 1, 1, 1]),
        node("Clip", ["c1", "lo", "hi"], "a1"),  # read by unpadded Convs only: re-centred
        node("Conv", ["a1", "c2/w"], "c2", strides=[2, 2]),  # (no bias: one is added)
        node("Conv", ["a1", "c3/w", "c3/b"], "c3", strides=[2, 2], group=2),
        node("Clip", ["c3", "lo", "hi"], "a3"),  # read by a padded Conv: left as it is
        node("Conv", ["a3", "c4/w", "c4/b"], "c4", pads=[1, 1, 1, 1], group=4),
        node("Clip", ["c4", "lo", "hi"], "a4"),  # feeds the read-out: left as it is
        node("Add", ["c2", "a4"], "h"),
    ),
    {
        "c1/w": w(4, 3, 3, 3, scale=3.0),
        "c1/b": w(4, seed=2, scale=2.0),
        "c2/w": w(4, 4, 1, 1, seed=3, scale=2.0),
        "c3/w": w(4, 2, 2, 2, seed=4, scale=2.0),
        "c3/b": w(4, seed=5),
        "c4/w": w(4, 1, 3, 3, seed=6, scale=2.0),
        "c4/b": w(4, seed=7),
        **RELU6,
    },
    scale=2.0,
)


def _clip_bounds(graph: onnx.GraphProto) -> dict[str, tuple[float, float]]:
    constants = {i.name: float(numpy_helper.to_array(i)) for i in graph.initializer if not i.dims}
    return {
        n.output[0]: (constants[n.input[1]], constants[n.input[2]])
        for n in graph.node
        if n.op_type == "Clip"
    }


def test_clips_read_only_by_unpadded_convs_are_centred() -> None:
    model = classifier(RELU6_CHAIN)
    x = _array(BATCH, *RELU6_CHAIN.shape, seed=7, scale=RELU6_CHAIN.scale)
    clipped = tensor_value(model, "a1", x)
    assert (clipped == 0).any()  # both bounds are in play
    assert (clipped == 6).any()
    seeds = _array(BATCH, CLASSES, seed=8)
    spec = GradientSpec("logits", wrt_input=True)
    bounds = _clip_bounds(build_gradient_model(model, spec).graph)
    assert bounds == {"a1": (-3.0, 3.0), "a3": (0.0, 6.0), "a4": (0.0, 6.0)}
    outputs = run_gradients(model, spec, x, seeds)
    assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(outputs["logits"], plain.run(None, {"x": x})[0], rtol=1e-5)


def test_a_clip_whose_value_is_returned_keeps_its_bounds() -> None:
    model = classifier(RELU6_CHAIN)
    x = _array(BATCH, *RELU6_CHAIN.shape, seed=9, scale=RELU6_CHAIN.scale)
    seeds = _array(BATCH, CLASSES, seed=10)
    spec = GradientSpec("logits", layer="a1", wrt_input=True)
    assert _clip_bounds(build_gradient_model(model, spec).graph)["a1"] == (0.0, 6.0)
    outputs = run_gradients(model, spec, x, seeds)
    assert_close(outputs["activation"], tensor_value(model, "a1", x))
    assert_close(outputs["grad_layer"], numeric_gradient(model, x, seeds, "a1"))
    assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))


@pytest.mark.parametrize(
    "case", [c for c in MAX_POOL_CASES if c.name != "max_pool_with_indices"], ids=str
)
def test_max_pool_ties_go_to_the_first_maximum_as_indices_say(case: Case) -> None:
    """On integer inputs most windows tie; both rules give each window's gradient to its
    first maximum (MaxPool's Indices below opset 18, the taps and Col2Im from 18)."""
    x = np.round(_array(BATCH, *case.shape, seed=3, scale=1.5))
    seeds = _array(BATCH, CLASSES, seed=4)
    spec = GradientSpec("logits", wrt_input=True)
    by_indices = run_gradients(classifier(case), spec, x, seeds)["grad_input"]
    newer = Case(case.name, case.shape, case.nodes, case.weights, opset=18)
    by_taps = run_gradients(classifier(newer), spec, x, seeds)["grad_input"]

    assert np.count_nonzero(by_taps) < x.size  # ties: windows share their maxima
    np.testing.assert_allclose(by_taps, by_indices, rtol=1e-6, atol=1e-7)


def test_backward_stops_at_the_layer() -> None:
    """The layer's gradient needs nothing upstream of it, even what cannot be differentiated."""
    case = Case(
        "stops",
        IMAGE,
        (
            node("Sin", ["x"], "wave"),
            node("Conv", ["wave", "conv/w"], "features", pads=[1, 1, 1, 1]),
            node("Relu", ["features"], "h"),
        ),
        CONV,
    )
    model = classifier(case)
    gradient_model = build_gradient_model(model, GradientSpec("logits", layer="h"))
    backward = {n.op_type for n in gradient_model.graph.node if n.name.startswith("grad/")}
    assert backward <= {"Gemm", "Reshape", "Identity"}
    with pytest.raises(UnsupportedModel, match=r"Sin node 'wave/Sin'"):
        build_gradient_model(model, GradientSpec("logits", layer="h", wrt_input=True))


# --- guided backprop -------------------------------------------------------------------------


def _hard_swish_slope(x: Array) -> Array:
    return np.where(x < -3, 0.0, np.where(x >= 3, 1.0, x / 3 + 0.5))


def test_guided_gradient_matches_numpy() -> None:
    weights = {f"w{i}": w(8, 8, seed=20 + i, scale=0.6) for i in range(3)}
    case = Case(
        "guided",
        (8,),
        (
            node("Gemm", ["x", "w0"], "z1", transB=1),
            node("Relu", ["z1"], "a1"),
            node("Gemm", ["a1", "w1"], "z2", transB=1),
            node("Clip", ["z2", "lo", "hi"], "a2"),
            node("Gemm", ["a2", "w2"], "z3", transB=1),
            node("HardSwish", ["z3"], "h"),
        ),
        {**weights, **RELU6},
        scale=3.0,
    )
    model = classifier(case)
    x = _array(BATCH, 8, seed=5, scale=3.0)
    seeds = _array(BATCH, CLASSES, seed=6)
    spec = GradientSpec("logits", layer="z1", wrt_input=True, guided=True)
    outputs = run_gradients(model, spec, x, seeds)

    z1, z2, z3 = (tensor_value(model, name, x) for name in ("z1", "z2", "z3"))
    readout = numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "readout/w")
    )
    grad = seeds.astype(np.float64) @ readout
    grad = np.maximum(grad, 0) * _hard_swish_slope(z3)
    grad = np.maximum(grad @ weights["w2"], 0) * ((z2 > 0) & (z2 < 6))
    grad_a1 = grad @ weights["w1"]
    grad_z1 = np.maximum(grad_a1, 0) * (z1 > 0)
    assert_close(outputs["grad_layer"], grad_z1)
    assert_close(outputs["grad_input"], grad_z1 @ weights["w0"])
    # Negative gradients do not pass the ReLU, even where it was open.
    assert (outputs["grad_layer"] >= 0).all()
    assert ((grad_a1 < 0) & (z1 > 0)).any()


def test_guided_rule_on_feature_maps() -> None:
    """Across c1 -> Relu -> mid the guided gradient is max(gradient at mid, 0) where mid > 0."""
    model = classifier(NETWORK)
    x = _array(BATCH, *NETWORK.shape, seed=7)
    seeds = _array(BATCH, CLASSES, seed=8)
    below = run_gradients(model, GradientSpec("logits", layer="c1", guided=True), x, seeds)
    above = run_gradients(model, GradientSpec("logits", layer="mid", guided=True), x, seeds)
    at_mid, open_ = above["grad_layer"], tensor_value(model, "mid", x) > 0
    assert (at_mid[open_] < 0).any()  # something for the rule to stop
    assert_close(below["grad_layer"], np.maximum(at_mid, 0) * open_)


# --- what cannot be differentiated ---------------------------------------------------------


def test_an_op_without_a_rule_on_the_path_is_named() -> None:
    case = Case("sin", IMAGE, (node("Sin", ["x"], "wave"), node("Relu", ["wave"])))
    with pytest.raises(UnsupportedModel, match=r"cannot differentiate Sin node 'wave/Sin'"):
        build_gradient_model(classifier(case), GradientSpec("logits", wrt_input=True))


def test_ops_off_the_path_are_ignored() -> None:
    """An ArgMax on a side branch and a Sin feeding only another output need no gradient."""
    model = classifier(Case("side", IMAGE, (node("Relu", ["x"]),)))
    graph = model.graph
    graph.node.extend([node("ArgMax", ["h"], "winner", axis=1), node("Sin", ["logits"], "other")])
    graph.output.extend([onnx.ValueInfoProto(name="winner"), onnx.ValueInfoProto(name="other")])
    x = _array(BATCH, *IMAGE, seed=1)
    seeds = _array(BATCH, CLASSES, seed=2)
    outputs = run_gradients(model, GradientSpec("logits", layer="h", wrt_input=True), x, seeds)
    assert list(outputs) == ["logits", "activation", "grad_layer", "grad_input"]
    assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))


def test_supported_ops_cover_the_required_ones() -> None:
    required = {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "LeakyRelu", "Sigmoid",
        "HardSigmoid", "HardSwish", "Mul", "Add", "Sub", "Div", "BatchNormalization", "MaxPool",
        "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Concat", "Pad",
        "Squeeze", "Unsqueeze", "Softmax", "Dropout", "Identity",
    }  # fmt: skip
    assert required <= set(supported_ops())


def test_an_unknown_layer_is_invalid() -> None:
    model = classifier(Case("relu", IMAGE, (node("Relu", ["x"]),)))
    with pytest.raises(InvalidParameters, match="no_such_layer"):
        build_gradient_model(model, GradientSpec("logits", layer="no_such_layer"))
    with pytest.raises(InvalidParameters, match="nothing to differentiate"):
        build_gradient_model(model, GradientSpec("logits"))


def test_internal_names_that_clash_with_new_ones_are_renamed() -> None:
    case = Case("clash", IMAGE, (node("Relu", ["x"], "seed"), node("Sigmoid", ["seed"])))
    model = classifier(case)
    x = _array(BATCH, *IMAGE, seed=1)
    seeds = _array(BATCH, CLASSES, seed=2)
    outputs = run_gradients(model, GradientSpec("logits", layer="seed", wrt_input=True), x, seeds)
    assert_close(outputs["activation"], tensor_value(model, "seed", x))
    assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))


@pytest.mark.parametrize(
    ("case", "opset", "expected"),
    [
        (NETWORK, 13, 16),  # MaxPool's gradient needs ScatterElements(reduction="add")
        (CASES[0], 11, 13),
        (CASES[0], 14, 14),  # below 15, Shape has no start/end
    ],
    ids=["maxpool_13", "conv_11", "conv_14"],
)
def test_opsets(case: Case, opset: int, expected: int) -> None:
    model = classifier(case)
    model.opset_import[0].version = opset  # these ops read the same at every opset here
    x = _array(BATCH, *case.shape, seed=7)
    seeds = _array(BATCH, CLASSES, seed=8)
    spec = GradientSpec("logits", wrt_input=True, paired=True)
    assert build_gradient_model(model, spec).opset_import[0].version == expected
    outputs = run_gradients(model, spec, x, seeds)
    assert_close(outputs["grad_input"], numeric_gradient(model, x, seeds))


# --- the default model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0(default_model_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(default_model_dir / "efficientnet-lite0" / "model.onnx"))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def test_lite0_input_gradient_matches_directional_differences(lite0: onnx.ModelProto) -> None:
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    forward = _session(lite0)
    logits = forward.run(None, {"input": x})[0]
    target = int(np.argmax(logits[0]))
    seed = np.zeros((1, 1000), np.float32)
    seed[0, target] = 1.0
    gradient_model = build_gradient_model(lite0, GradientSpec("logits", wrt_input=True))
    onnx.checker.check_model(gradient_model)
    scores, grad = _session(gradient_model).run(None, {"input": x, "seed": seed})
    # Re-centred ReLU6s move biases between layers: float rounding, ~3e-5 on logits of ~10.
    np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-4)
    for i in range(3):
        rng = np.random.default_rng(10 + i)
        # Half along a random reweighting of the gradient, half pure noise: a purely random
        # direction in 150k dimensions sees ~1/400 of the gradient, below float32 noise.
        aligned = grad * rng.uniform(0, 1, x.shape).astype(np.float32)
        noise = rng.normal(size=x.shape).astype(np.float32)
        direction = aligned / np.linalg.norm(aligned) + noise / np.linalg.norm(noise)
        direction /= np.linalg.norm(direction)
        eps = 3e-3  # (1e-2 also passes; the error shrinks with eps: kinks, not the gradient)
        up = forward.run(None, {"input": x + eps * direction})[0][0, target]
        down = forward.run(None, {"input": x - eps * direction})[0][0, target]
        numeric = float(up - down) / (2 * eps)
        analytic = float(np.sum(grad * direction))
        assert abs(numeric - analytic) < 2e-2 * abs(numeric), (i, numeric, analytic)


def test_lite0_gradcam_layer_gradient_is_the_fc_row_over_49(lite0: onnx.ModelProto) -> None:
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    classes = [3, 281, 999]
    seeds = np.zeros((3, 1000), np.float32)
    seeds[np.arange(3), classes] = 1.0
    gradient_model = build_gradient_model(lite0, GradientSpec("logits", layer="head/relu6"))
    backward = [n.op_type for n in gradient_model.graph.node if n.name.startswith("grad/")]
    # Gemm, Flatten and GlobalAveragePool backwards, then the outputs
    assert set(backward) <= {"Gemm", "Reshape", "Mul", "Expand", "Identity"}, backward
    logits, activation, grad = _session(gradient_model).run(None, {"input": x, "seed": seeds})
    assert logits.shape == (1, 1000)
    assert activation.shape == (1, 1280, 7, 7)
    assert activation.min() >= 0
    assert activation.max() <= 6
    fc = numpy_helper.to_array(next(i for i in lite0.graph.initializer if i.name == "fc/weight"))
    expected = np.broadcast_to(fc[classes][:, :, None, None] / 49.0, (3, 1280, 7, 7))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def _optimized_session(model: onnx.ModelProto) -> tuple[ort.InferenceSession, int]:
    """A session and the number of layout reorders onnxruntime put into its graph."""
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return session, sum(n.op_type.startswith("Reorder") for n in optimized.graph.node)


def test_lite0_paired_saliency_equals_unpaired_and_stays_blocked(lite0: onnx.ModelProto) -> None:
    """Paired seeds keep onnxruntime's backward in NCHWc: no reorder per activation."""
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    seeds = np.zeros((2, 1000), np.float32)
    seeds[0, 7], seeds[1, 400] = 1.0, 1.0
    results, reorders = [], []
    for paired in (True, False):
        model = build_gradient_model(lite0, GradientSpec("logits", wrt_input=True, paired=paired))
        session, count = _optimized_session(model)
        reorders.append(count)
        results.append(session.run(None, {"input": x, "seed": seeds}))
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    assert reorders[0] < 20 < reorders[1]

    paired_spec = GradientSpec("logits", wrt_input=True, paired=True)
    top_1 = add_top_k_seeds(build_gradient_model(lite0, paired_spec), "logits", 1000, paired=True)
    session, count = _optimized_session(top_1)
    assert count < 20
    logits, grad_input, targets = session.run(None, {"input": x})
    np.testing.assert_array_equal(targets, logits.argmax(axis=1))
    seeded = _session(build_gradient_model(lite0, paired_spec))
    expected = seeded.run(None, {"input": x, "seed": np.eye(1000, dtype=np.float32)[targets]})
    np.testing.assert_allclose(grad_input, expected[1], rtol=1e-4, atol=1e-7)


def test_lite0_several_seeds_saliency_equals_separate_runs(lite0: onnx.ModelProto) -> None:
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    seeds = np.zeros((2, 1000), np.float32)
    seeds[0, 7], seeds[1, 400] = 1.0, 1.0
    spec = GradientSpec("logits", wrt_input=True)
    session = _session(build_gradient_model(lite0, spec))
    logits, together = session.run(None, {"input": x, "seed": seeds})
    assert logits.shape == (1, 1000)
    for m in range(2):
        alone = session.run(None, {"input": x, "seed": seeds[m : m + 1]})[1]
        np.testing.assert_allclose(together[m], alone[0], rtol=1e-4, atol=1e-7)
