"""Backward rules of engines.graphs.structural against central finite differences.

Same harness as tests/test_gradients.py: each case is `x -> op(s) -> h` plus a random linear
read-out; the gradient graph runs in onnxruntime (float32), the reference differentiates the
same graph in float64 with onnx.reference.
"""

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from engines.errors import UnsupportedModel
from engines.graphs import GradientSpec, build_gradient_model
from tests.test_gradients import (
    BATCH,
    CLASSES,
    Array,
    Case,
    _array,
    assert_close,
    check_input_gradient,
    classifier,
    ints,
    node,
    numeric_gradient,
    run_gradients,
    tensor_value,
    w,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAP = (3, 4, 5)


def multi(op_type: str, inputs: list[str], outputs: list[str], **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, outputs, name=f"{outputs[0]}/{op_type}", **attrs)


def floats(*values: float) -> Array:
    return np.array(values, np.float32)


def resize_case(
    name: str, opset: int, inputs: dict[str, Array], shape: tuple[int, ...] = MAP, **attrs: Any
) -> Case:
    """Resize of x with `inputs` among roi, scales, sizes (the others left out)."""
    names = [n if n in inputs else "" for n in ("roi", "scales", "sizes")]
    while names and not names[-1]:
        names.pop()
    return Case(name, shape, (node("Resize", ["x", *names], **attrs),), inputs, opset=opset)


def split_concat(name: str, split: onnx.NodeProto, join: list[str], opset: int = 17) -> Case:
    return Case(name, (6, 4, 5), (split, node("Concat", join, axis=1)), {}, opset=opset)


def lrn_case(name: str, size: int, **attrs: Any) -> Case:
    """LRN over 5 channels; the reference sums the squares with a channel-wise AveragePool
    (onnx.reference's LRN reads past the last channel)."""
    alpha, beta, bias = attrs["alpha"], attrs["beta"], attrs["bias"]
    low, high = (size - 1) // 2, size // 2
    return Case(
        name,
        (5, 3, 3),
        (node("LRN", ["x"], size=size, **attrs),),
        {
            "column": ints(0, 1, 5, 9),
            "pads": ints(0, 0, low, 0, 0, 0, high, 0),
            "back": ints(0, 5, 3, 3),
            "coefficient": np.array(alpha, np.float32),
            "bias": np.array(bias, np.float32),
            "power": np.array(beta, np.float32),
        },
        reference=(
            node("Mul", ["x", "x"], "squares"),
            node("Reshape", ["squares", "column"], "stacked"),
            node("Pad", ["stacked", "pads"], "padded"),
            node("AveragePool", ["padded"], "mean", kernel_shape=[size, 1]),
            node("Reshape", ["mean", "back"], "window"),
            node("Mul", ["window", "coefficient"], "scaled"),
            node("Add", ["scaled", "bias"], "base"),
            node("Pow", ["base", "power"], "denominator"),
            node("Div", ["x", "denominator"]),
        ),
    )


LN = {"ln/s": w(5), "ln/b": w(5, seed=2)}
CASES = [
    # Split: sizes as input, as attribute, num_outputs, equal parts; unused outputs
    Case(
        "split_sizes_input",
        (6, 4, 5),
        (
            multi("Split", ["x", "sizes"], ["a", "b", "c"], axis=1),
            node("Concat", ["c", "a", "b"], axis=1),
        ),
        {"sizes": ints(1, 3, 2)},
    ),
    Case(
        "split_attribute_opset_11",
        (3, 4, 5),
        (
            multi("Split", ["x"], ["a", "b"], axis=-1, split=[3, 2]),
            node("Concat", ["b", "a"], axis=-1),
        ),
        opset=11,
    ),
    Case(
        "split_num_outputs_uneven",
        (3, 7),
        (
            multi("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3),
            node("Mul", ["a", "b"], "ab"),
            node("Concat", ["c", "ab"], axis=2),
        ),
        opset=18,
    ),
    split_concat(
        "split_equal_middle_unused",
        multi("Split", ["x"], ["a", "unused", "c"], axis=1),
        ["c", "a"],
    ),
    Case(
        "split_only_first_used",
        (6, 4),
        (multi("Split", ["x"], ["h", "rest"], axis=1, split=[2, 4]),),
        opset=12,
    ),
    # Slice: clamped ends, negative indices, steps > 1 and < 0, the batch axis kept whole
    Case(
        "slice_clamped",
        MAP,
        (node("Slice", ["x", "starts", "ends", "axes"]),),
        {"starts": ints(1, 0), "ends": ints(3, 100), "axes": ints(2, 3)},
    ),
    Case(
        "slice_negative_indices",
        MAP,
        (node("Slice", ["x", "starts", "ends", "axes"]),),
        {"starts": ints(-2), "ends": ints(-1), "axes": ints(1)},
    ),
    Case(
        "slice_steps",
        (3, 7, 9),
        (node("Slice", ["x", "starts", "ends", "axes", "steps"]),),
        {
            "starts": ints(0, -1, 1, 0),
            "ends": ints(INT64_MAX, INT64_MIN, 8, 2),
            "axes": ints(0, -1, 2, 1),
            "steps": ints(1, -2, 3, 1),
        },
    ),
    Case(
        "slice_negative_step_clamped_start",
        (3, 6),
        (node("Slice", ["x", "starts", "ends", "axes", "steps"]),),
        {"starts": ints(100), "ends": ints(1), "axes": ints(2), "steps": ints(-1)},
    ),
    Case(
        "slice_attributes_opset_9",
        MAP,
        (node("Slice", ["x"], starts=[1, -3], ends=[3, 1000], axes=[1, 3]),),
        opset=9,
    ),
    # Gather and GatherElements with constant indices
    Case(
        "gather_scalar_index",
        MAP,
        (node("Gather", ["x", "index"], axis=1),),
        {"index": np.array(2, np.int64)},
    ),
    Case(
        "gather_vector_negative_repeated",
        MAP,
        (node("Gather", ["x", "indices"], axis=2),),
        {"indices": ints(0, -1, 2, 2, 3)},
    ),
    Case(
        "gather_matrix_last_axis",
        MAP,
        (node("Gather", ["x", "indices"], axis=-1),),
        {"indices": np.array([[1, 0, 4], [3, 3, -5]], np.int64)},
    ),
    # Expand and Tile
    Case(
        "expand",
        (3, 1, 5),
        (node("Expand", ["x", "shape"]),),
        {"shape": ints(1, 1, 4, 5)},
    ),
    Case("expand_shorter_shape", (1, 4), (node("Expand", ["x", "shape"]),), {"shape": ints(3, 4)}),
    # ECA's gate.expand_as(features): the shape is computed at run time, from a batched tensor.
    Case(
        "expand_to_computed_shape",
        (3, 1, 1),
        (
            node("Add", ["x", "plane"], "wide"),
            node("Shape", ["wide"], "wide_shape"),
            node("Expand", ["x", "wide_shape"], "gate"),
            node("Mul", ["wide", "gate"]),
        ),
        {"plane": np.random.default_rng(7).standard_normal((1, 3, 4, 5)).astype(np.float32)},
    ),
    Case("tile", (2, 3, 4), (node("Tile", ["x", "repeats"]),), {"repeats": ints(1, 2, 1, 3)}),
    # Resize: modes, coordinate transformations, nearest modes, scales and sizes, opsets
    resize_case(
        "resize_nearest_half_pixel",
        13,
        {"roi": floats(), "scales": floats(1, 1, 2, 1.5)},
        mode="nearest",
    ),
    resize_case(
        "resize_nearest_asymmetric_floor_11",
        11,
        {"roi": floats(), "scales": floats(1, 1, 3, 2)},
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    ),
    resize_case(
        "resize_nearest_half_pixel_symmetric_ceil_19",
        19,
        {"scales": floats(0.6, 2.5)},
        mode="nearest",
        coordinate_transformation_mode="half_pixel_symmetric",
        nearest_mode="ceil",
        axes=[2, 3],
    ),
    Case(
        "resize_nearest_tf_half_pixel_ceil",
        MAP,
        (
            node(
                "Resize",
                ["x", "", "scales"],
                mode="nearest",
                coordinate_transformation_mode="tf_half_pixel_for_nn",
                nearest_mode="ceil",
            ),
        ),
        {
            "scales": floats(1, 1, 1.75, 0.8),
            "rows": np.minimum(np.ceil((np.arange(7) + 0.5) / 1.75), 3).astype(np.int64),
            "columns": np.minimum(np.ceil((np.arange(4) + 0.5) / 0.8), 4).astype(np.int64),
        },
        reference=(  # onnx.reference has no tf_half_pixel_for_nn: x = (i + 1/2) / scale
            node("Gather", ["x", "rows"], "picked_rows", axis=2),
            node("Gather", ["picked_rows", "columns"], axis=3),
        ),
        opset=13,
    ),
    resize_case(
        "resize_nearest_align_corners_prefer_ceil_18",
        18,
        {"sizes": ints(7, 3)},
        mode="nearest",
        coordinate_transformation_mode="align_corners",
        nearest_mode="round_prefer_ceil",
        axes=[2, 3],  # (onnx.reference's Resize fails on negative axes)
    ),
    resize_case(
        "resize_linear_half_pixel",
        13,
        {"roi": floats(), "scales": floats(1, 1, 2, 2)},
        mode="linear",
    ),
    resize_case(
        "resize_linear_pytorch_half_pixel_sizes_18",
        18,
        {"sizes": ints(9, 1)},
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
        axes=[2, 3],
    ),
    resize_case(
        "resize_linear_align_corners",
        13,
        {"roi": floats(), "scales": floats(1, 1, 1.5, 0.6)},
        mode="linear",
        coordinate_transformation_mode="align_corners",
    ),
    resize_case(
        "resize_linear_asymmetric_19",
        19,
        {"scales": floats(2, 3)},
        mode="linear",
        coordinate_transformation_mode="asymmetric",
        axes=[2, 3],
    ),
    resize_case(
        "resize_cubic",
        13,
        {"roi": floats(), "scales": floats(1, 1, 2, 1.5)},
        mode="cubic",
    ),
    Case(
        "upsample_7_attribute",
        MAP,
        (node("Upsample", ["x"], scales=[1.0, 1.0, 2.0, 3.0]),),
        {
            "split": ints(0, 3, 4, 1, 5, 1),
            "repeats": ints(1, 1, 1, 2, 1, 3),
            "join": ints(0, 3, 8, 15),
        },
        reference=(  # (onnx.reference has no Upsample-7)
            node("Reshape", ["x", "split"], "split_axes"),
            node("Tile", ["split_axes", "repeats"], "tiled"),
            node("Reshape", ["tiled", "join"]),
        ),
        opset=7,
    ),
    Case(
        "upsample_9_input",
        MAP,
        (node("Upsample", ["x", "scales"]),),
        {"scales": floats(1, 1, 2, 2)},
        opset=9,
    ),
    # DepthToSpace and SpaceToDepth
    Case("depth_to_space_dcr", (8, 3, 2), (node("DepthToSpace", ["x"], blocksize=2),)),
    Case("depth_to_space_crd", (8, 3, 2), (node("DepthToSpace", ["x"], blocksize=2, mode="CRD"),)),
    Case("space_to_depth", (2, 4, 6), (node("SpaceToDepth", ["x"], blocksize=2),)),
    # MatMul with batched operands
    Case(
        "matmul_batched_both_operands",
        (2, 3, 4),
        (
            node("Transpose", ["x"], "xt", perm=[0, 1, 3, 2]),
            node("Sigmoid", ["xt"], "gate"),
            node("MatMul", ["x", "gate"]),
        ),
    ),
    Case(
        "matmul_constant_broadcast",
        (3, 2, 4),
        (node("MatMul", ["x", "m/w"]),),
        {"m/w": w(3, 4, 5)},
    ),
    Case(
        "matmul_operand_broadcast_inside",
        (1, 3, 4),
        (
            node("Mul", ["x", "k"], "heads"),
            node("Transpose", ["heads"], "keys", perm=[0, 1, 3, 2]),
            node("MatMul", ["x", "keys"]),
        ),
        {"k": w(2, 1, 1)},
    ),
    Case(
        "matmul_constant_vector_times_batched",
        (3, 4, 5),
        (node("MatMul", ["v", "x"]),),
        {"v": w(4)},
    ),
    # Einsum
    Case(
        "einsum_cam",
        (3, 4, 4),
        (
            node("Conv", ["x", "c/w"], "maps"),
            node("Einsum", ["x", "maps"], equation="bchw,bkhw->bck"),
        ),
        {"c/w": w(2, 3, 1, 1)},
    ),
    Case(
        "einsum_attention",
        (2, 3, 4),
        (
            node("Sigmoid", ["x"], "keys"),
            node("Einsum", ["x", "keys"], equation="bhqd, bhkd -> bhqk"),
        ),
    ),
    Case(
        "einsum_constant_implicit_output",
        (3, 4),
        (node("Einsum", ["x", "e/w"], equation="bij,jk"),),
        {"e/w": w(4, 5)},
    ),
    Case(
        "einsum_label_summed_out",
        (3, 4, 5),
        (node("Einsum", ["x", "e/v"], equation="bcij,c->bci"),),
        {"e/v": w(3)},
    ),
    # normalisations
    Case(
        "layer_norm_last_axis",
        MAP,
        (node("LayerNormalization", ["x", "ln/s", "ln/b"], epsilon=1e-3),),
        LN,
    ),
    Case(
        "layer_norm_axis_1_computed_scale",
        MAP,
        (
            node("Sigmoid", ["ln/s3"], "scale"),
            node("LayerNormalization", ["x", "scale"], axis=1),
        ),
        {"ln/s3": w(3, 4, 5, scale=2.0)},
    ),
    Case(
        "instance_norm",
        MAP,
        (node("InstanceNormalization", ["x", "in/s", "in/b"], epsilon=1e-3),),
        {"in/s": w(3), "in/b": w(3, seed=2)},
    ),
    lrn_case("lrn", 3, alpha=0.5, beta=0.75, bias=1.5),
    lrn_case("lrn_wide_window", 5, alpha=0.3, beta=0.6, bias=1.0),
]
BY_NAME = {case.name: case for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_input_gradient_matches_finite_differences(case: Case) -> None:
    check_input_gradient(case)


ONE_IMAGE = [
    "split_equal_middle_unused",
    "slice_steps",
    "gather_matrix_last_axis",
    "expand",
    "tile",
    "resize_linear_half_pixel",
    "depth_to_space_crd",
    "matmul_batched_both_operands",
    "matmul_operand_broadcast_inside",
    "einsum_cam",
    "layer_norm_last_axis",
    "lrn",
]
# Constant indices fix the batch (here 1); the reference expands them to its large batch.
GATHER_ELEMENTS = {
    "indices": np.random.default_rng(4).integers(-5, 5, (1, 3, 4, 7)),
    "zero": ints(0),
    "one": ints(1),
    "rest": ints(3, 4, 7),
}
GATHER_ELEMENTS_ONE = Case(
    "gather_elements_negative_repeated",
    MAP,
    (node("GatherElements", ["x", "indices"], axis=3),),
    GATHER_ELEMENTS,
    reference=(
        node("Shape", ["x"], "shape"),
        node("Slice", ["shape", "zero", "one"], "batch"),
        node("Concat", ["batch", "rest"], "index_shape", axis=0),
        node("Expand", ["indices", "index_shape"], "batch_indices"),
        node("GatherElements", ["x", "batch_indices"], axis=3),
    ),
)


@pytest.mark.parametrize(
    "case", [BY_NAME[name] for name in ONE_IMAGE] + [GATHER_ELEMENTS_ONE], ids=str
)
def test_several_seeds_for_one_image_match_finite_differences(case: Case) -> None:
    model = classifier(case)
    x = _array(1, *case.shape, seed=3, scale=case.scale)
    seeds = _array(3, CLASSES, seed=4)
    outputs = run_gradients(model, GradientSpec("logits", wrt_input=True), x, seeds)
    assert outputs["grad_input"].shape == (3, *case.shape)
    expected = numeric_gradient(classifier(case.for_reference()), x, seeds)
    assert_close(outputs["grad_input"], expected)


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("split_sizes_input", "b"),
        ("einsum_cam", "maps"),
        ("matmul_batched_both_operands", "gate"),
        ("layer_norm_axis_1_computed_scale", "x"),
    ],
)
def test_layer_gradient_matches_finite_differences(name: str, layer: str) -> None:
    model = classifier(BY_NAME[name])
    x = _array(BATCH, *BY_NAME[name].shape, seed=5)
    seeds = _array(BATCH, CLASSES, seed=6)
    outputs = run_gradients(model, GradientSpec("logits", layer=layer), x, seeds)
    assert_close(outputs["activation"], tensor_value(model, layer, x))
    assert_close(outputs["grad_layer"], numeric_gradient(model, x, seeds, layer))


def test_a_layer_read_beside_the_differentiated_operand_is_a_forward_tensor() -> None:
    """Einsum's other operand depends on the input but not on the layer: it has batch N."""
    model = classifier(BY_NAME["einsum_cam"])
    x = _array(1, *BY_NAME["einsum_cam"].shape, seed=5)
    seeds = _array(3, CLASSES, seed=6)
    outputs = run_gradients(model, GradientSpec("logits", layer="maps"), x, seeds)
    assert_close(outputs["grad_layer"], numeric_gradient(model, x, seeds, "maps"))


def test_resize_backward_is_matrix_products() -> None:
    model = classifier(BY_NAME["resize_linear_half_pixel"])
    graph = build_gradient_model(model, GradientSpec("logits", wrt_input=True)).graph
    backward = [n.op_type for n in graph.node if n.name.startswith("grad/")]
    assert backward.count("MatMul") == 2
    assert "Transpose" not in backward


def test_upsample_linear_matches_finite_differences() -> None:
    def case(nodes: tuple[onnx.NodeProto, ...], opset: int) -> Case:
        return Case("upsample_linear", MAP, nodes, {"scales": floats(1, 1, 2, 2)}, opset=opset)

    model = classifier(case((node("Upsample", ["x", "scales"], mode="linear"),), 9))
    # (onnx.reference has no linear Upsample; Upsample is Resize with asymmetric coordinates)
    as_resize = node(
        "Resize", ["x", "", "scales"], mode="linear", coordinate_transformation_mode="asymmetric"
    )
    reference = classifier(case((as_resize,), 13))
    x = _array(BATCH, *MAP, seed=7)
    seeds = _array(BATCH, CLASSES, seed=8)
    outputs = run_gradients(model, GradientSpec("logits", wrt_input=True), x, seeds)
    assert_close(outputs["grad_input"], numeric_gradient(reference, x, seeds))


REFUSED = [
    (
        Case("gather_batch", MAP, (node("Gather", ["x", "i"], axis=0),), {"i": ints(0, 0)}),
        "batch axis",
    ),
    (
        Case(
            "slice_batch",
            MAP,
            (node("Slice", ["x", "starts", "ends", "axes"]),),
            {"starts": ints(0), "ends": ints(1), "axes": ints(0)},
        ),
        "slices the batch axis",
    ),
    (
        Case("split_batch", MAP, (multi("Split", ["x"], ["h", "other"], axis=0),)),
        "batch axis",
    ),
    (
        Case("tile_batch", MAP, (node("Tile", ["x", "r"]),), {"r": ints(2, 1, 1, 1)}),
        "tiles the batch axis",
    ),
    (
        Case("expand_batch", (3, 1), (node("Expand", ["x", "s"]),), {"s": ints(2, 3, 4)}),
        "may expand the batch axis",
    ),
    (
        resize_case(
            "resize_batch", 13, {"roi": floats(), "scales": floats(2, 1, 1, 1)}, mode="nearest"
        ),
        "resizes the batch axis",
    ),
    (
        resize_case(
            "resize_crop",
            13,
            {"roi": floats(0, 0, 0, 0, 1, 1, 1, 1), "scales": floats(1, 1, 2, 2)},
            mode="linear",
            coordinate_transformation_mode="tf_crop_and_resize",
        ),
        "tf_crop_and_resize",
    ),
    (
        Case(
            "matmul_batch_contracted",
            (4,),
            (node("Transpose", ["x"], "xt", perm=[1, 0]), node("MatMul", ["xt", "x"])),
        ),
        "batch axis would not stay",
    ),
    (
        Case(
            "einsum_batch_summed",
            (4,),
            (node("Einsum", ["x", "x"], equation="bi,bj->ij"),),
        ),
        "batch axis",
    ),
    (
        Case("einsum_diagonal", (4, 4), (node("Einsum", ["x"], equation="bii->bi"),)),
        "diagonal",
    ),
]


@pytest.mark.parametrize(("case", "reason"), REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_what_mixes_the_batch_or_is_not_supported_is_refused(case: Case, reason: str) -> None:
    with pytest.raises(UnsupportedModel, match=reason):
        build_gradient_model(classifier(case), GradientSpec("logits", wrt_input=True))


def _group_norm(opset: int, scale_size: int, **stash: int) -> onnx.ModelProto:
    """x [N, 4, 3, 3] -> GroupNormalization (2 groups) -> linear read-out, at `opset`.

    onnx's shape inference gives GroupNormalization's output no type or shape (so the harness's
    classifier cannot be used): the model declares them. Opset 21 computes in `stash_type`,
    float32 unless told: the float64 reference must say double.
    """
    weights = {
        "gn/s": w(scale_size),
        "gn/b": w(scale_size, seed=2),
        "readout/w": w(CLASSES, 36, seed=3, scale=1 / 6),
        "readout/b": w(CLASSES, seed=4),
    }
    nodes = [
        node("GroupNormalization", ["x", "gn/s", "gn/b"], "h", num_groups=2, epsilon=1e-3, **stash),
        node("Flatten", ["h"], "flat"),
        node("Gemm", ["flat", "readout/w", "readout/b"], "logits", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        f"group_norm_{opset}",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 3, 3])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
        value_info=[helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["N", 4, 3, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset > 20 else 9
    return model


@pytest.mark.parametrize(("opset", "scale_size"), [(18, 2), (21, 4)], ids=["18", "21"])
@pytest.mark.parametrize("images", [BATCH, 1])
def test_group_norm_matches_finite_differences(opset: int, scale_size: int, images: int) -> None:
    model = _group_norm(opset, scale_size)
    x = _array(images, 4, 3, 3, seed=7)
    seeds = _array(3 if images == 1 else images, CLASSES, seed=8)
    gradient_model = build_gradient_model(model, GradientSpec("logits", wrt_input=True))
    session = ort.InferenceSession(
        gradient_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    grad = session.run(["grad_input"], {"x": x, "seed": seeds})[0]
    stash = {"stash_type": onnx.TensorProto.DOUBLE} if opset >= 21 else {}
    assert_close(grad, numeric_gradient(_group_norm(opset, scale_size, **stash), x, seeds))
