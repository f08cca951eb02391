"""Tiny ONNX graphs built with onnx.helper, small enough to work their answers out by hand."""

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def channel_mean_model(path: Path, layout: str = "NCHW", size: int = 16) -> None:
    """Output = the spatial mean of each input channel, shape (N, 3).

    Whatever preprocessing did to a solid-colour image shows up verbatim in the output.
    """
    shape: list[str | int]
    if layout == "NCHW":
        shape, axes = ["N", 3, size, size], [2, 3]
    else:
        shape, axes = ["N", size, size, 3], [1, 2]
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["means"], axes=axes, keepdims=0),
        ],
        "channel_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["N", 3])],
    )
    _save(graph, path)


def small_cnn_model(path: Path, size: int = 16) -> None:
    _save(_small_cnn_graph(size), path)


def _small_cnn_graph(size: int) -> onnx.GraphProto:
    """Conv(3->4, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4->3).

    Conv channels 0-2 copy input channels 0-2 (a centre tap of 1) and channel 3 is random; the
    Gemm weight is the identity on the first three channels, so class c's logit is the mean of
    ReLU(input channel c): a solid red image is class 0, green 1, blue 2.
    """
    rng = np.random.default_rng(0)
    conv_w = np.zeros((4, 3, 3, 3), dtype=np.float32)
    for channel in range(3):
        conv_w[channel, channel, 1, 1] = 1.0
    conv_w[3] = rng.normal(size=(3, 3, 3))
    conv_b = np.zeros(4, dtype=np.float32)
    fc_w = np.eye(3, 4, dtype=np.float32)
    fc_b = np.zeros(3, dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(fc_b, "fc_b"),
        ],
    )
    return graph


def quantized_cnn_model(path: Path, size: int = 16) -> None:
    """`small_cnn_model` as onnxruntime's static quantizer writes it (QDQ format): the input and
    the ReLU's output pass through QuantizeLinear -> DequantizeLinear (int8, scale 1/64), so
    class c's logit is the mean of ReLU(input channel c) rounded to 1/64."""
    graph = _small_cnn_graph(size)
    renamed = {"x": "x_dq", "relu": "relu_dq"}
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    quantize = []
    for name in ("x", "relu"):
        quantize += [
            helper.make_node(
                "QuantizeLinear", [name, "q_scale", "q_zero"], [f"{name}_q"], name=f"{name}_Q"
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{name}_q", "q_scale", "q_zero"],
                [f"{name}_dq"],
                name=f"{name}_DQ",
            ),
        ]
    nodes = list(graph.node)
    relu = next(i for i, n in enumerate(nodes) if n.op_type == "Relu")
    nodes = [*quantize[:2], *nodes[: relu + 1], *quantize[2:], *nodes[relu + 1 :]]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1 / 64, np.float32), "q_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "q_zero"),
        ]
    )
    _save(graph, path)


def gray_brightness_model(path: Path, size: int = 16) -> None:
    """A one-channel (grayscale) CNN: Conv(1->2, 1x1, weights +1 and -1) -> Relu ->
    GlobalAveragePool -> Flatten, so logit 0 is the mean of ReLU(x) ("bright") and logit 1
    the mean of ReLU(-x) ("dark")."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gray_brightness",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(np.array([1.0, -1.0], np.float32).reshape(2, 1, 1, 1), "conv_w")
        ],
    )
    _save(graph, path)


def write_model_folder(
    folder: Path,
    build: str = "small_cnn",
    *,
    layout: str = "NCHW",
    color: str = "RGB",
    scale: float = 1.0,
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
    output: str = "logits",
    size: int = 16,
    labels: tuple[str, ...] = ("red", "green", "blue"),
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if build == "small_cnn":
        small_cnn_model(folder / "model.onnx", size=size)
    elif build == "region_mean":
        region_mean_model(folder / "model.onnx", size=size)
    elif build == "weighted_region":
        weighted_region_model(folder / "model.onnx", size=size)
    elif build == "gray_brightness":
        gray_brightness_model(folder / "model.onnx", size=size)
    elif build == "quantized_cnn":
        quantized_cnn_model(folder / "model.onnx", size=size)
    elif build == "strided_residual":
        strided_residual_model(folder / "model.onnx", size=size)
    else:
        channel_mean_model(folder / "model.onnx", layout=layout, size=size)
    config = {
        "description": f"tiny {build} test model",
        "input": {
            "height": size,
            "width": size,
            "color": color,
            "layout": layout,
            "scale": scale,
            "mean": list(mean),
            "std": list(std),
        },
        "output": output,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    return folder


REGION = (slice(4, 9), slice(6, 12))  # rows 4-8, columns 6-11 of a 16x16 input


def region_mean_model(path: Path, size: int = 16) -> None:
    """logits = [mean of the input over REGION (all channels), 0]: a known occlusion answer."""
    starts = [0, 0, REGION[0].start, REGION[1].start]
    ends = [2**31 - 1, 3, REGION[0].stop, REGION[1].stop]
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends"], ["region"]),
        helper.make_node("ReduceMean", ["region"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "axis1"], ["mean_column"]),
        helper.make_node("Mul", ["mean_column", "zero"], ["zero_column"]),
        helper.make_node("Concat", ["mean_column", "zero_column"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "region_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(np.array(starts, np.int64), "starts"),
            numpy_helper.from_array(np.array(ends, np.int64), "ends"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    _save(graph, path)


WEIGHTED_REGION = (slice(16, 40), slice(28, 52))  # rows and columns of a 64x64 input


def weighted_region_model(path: Path, size: int = 64) -> None:
    """logits = [s, -s] with s the mean of the input over WEIGHTED_REGION (all channels): a
    mask-weighted mean of the pixels fed to a linear head, blind outside the region."""
    weights = np.zeros((1, 3, size, size), dtype=np.float32)
    weights[(0, slice(None), *WEIGHTED_REGION)] = 1.0
    weights /= weights.sum()
    nodes = [
        helper.make_node("Mul", ["x", "weights"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axes"], ["mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "axis1"], ["mean_column"]),
        helper.make_node("MatMul", ["mean_column", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "weighted_region",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([[1.0, -1.0]], np.float32), "head"),
        ],
    )
    _save(graph, path)


def strided_residual_model(path: Path, size: int = 32) -> None:
    """A small CNN with what incremental occlusion must follow exactly (random weights).

    Conv 3x3 stride 2 with TF "same" pads (0 before, 1 after) -> Relu -> Conv 1x1 -> Clip ->
    depthwise Conv 3x3 -> Add (residual) -> Relu -> Pad (1 before) -> MaxPool 3x3 stride 2 ->
    Mul by a per-channel scale -> Conv 3x3 (auto_pad SAME_UPPER) -> Relu -> GlobalAveragePool
    -> Flatten -> Gemm to 3 logits.
    """
    rng = np.random.default_rng(7)

    def weight(*shape: int) -> np.ndarray:
        return rng.normal(scale=0.5, size=shape).astype(np.float32)

    initializers = {
        "stem_w": weight(4, 3, 3, 3),
        "stem_b": weight(4),
        "expand_w": weight(8, 4, 1, 1),
        "expand_b": weight(8),
        "low": np.array(0.0, np.float32),
        "high": np.array(6.0, np.float32),
        "depthwise_w": weight(8, 1, 3, 3),
        "pads": np.array([0, 0, 1, 1, 0, 0, 0, 0], np.int64),
        "scale": weight(1, 8, 1, 1),
        "head_w": weight(8, 8, 3, 3),
        "fc_w": weight(3, 8),
        "fc_b": weight(3),
    }
    nodes = [
        helper.make_node(
            "Conv", ["x", "stem_w", "stem_b"], ["stem"], strides=[2, 2], pads=[0, 0, 1, 1]
        ),
        helper.make_node("Relu", ["stem"], ["stem_relu"]),
        helper.make_node("Conv", ["stem_relu", "expand_w", "expand_b"], ["expand"]),
        helper.make_node("Clip", ["expand", "low", "high"], ["expand_clip"]),
        helper.make_node(
            "Conv", ["expand_clip", "depthwise_w"], ["depthwise"], group=8, pads=[1, 1, 1, 1]
        ),
        helper.make_node("Add", ["depthwise", "expand_clip"], ["residual"]),
        # Non-negative before the Pad: a plain onnxruntime session fuses Pad into MaxPool,
        # whose own padding is -inf, which equals zeros only there (the service keeps the Pad
        # apart: engines.graphs.normalize).
        helper.make_node("Relu", ["residual"], ["residual_relu"]),
        helper.make_node("Pad", ["residual_relu", "pads"], ["padded"]),
        helper.make_node("MaxPool", ["padded"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Mul", ["pooled", "scale"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "head_w"], ["head"], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["head"], ["head_relu"]),
        helper.make_node("GlobalAveragePool", ["head_relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "strided_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    _save(graph, path)
