"""Exported-model noise: free height and width, shape arithmetic, a fixed batch, float16, If
nodes and guided backprop without ReLUs, each on a tiny graph with a twin whose answer is known.

Every comparison runs the served model through real HTTP against a clean twin of the same
weights (static dims, constant pads, float32, free batch).
"""

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from engines.graphs.normalize import normalize
from tests.conftest import make_client

Array = npt.NDArray[Any]
SIZE = 16
OPSET = 17
RNG = np.random.default_rng(3)
CONV_W = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
CONV_B = RNG.normal(size=4).astype(np.float32) * 0.1
FC_W = RNG.normal(size=(3, 4)).astype(np.float32)
FC_B = RNG.normal(size=3).astype(np.float32) * 0.1


def _save(
    folder: Path,
    nodes: list[onnx.NodeProto],
    inits: dict[str, Array],
    input_dims: list[Any],
    output_dims: list[Any],
    elem: int = TensorProto.FLOAT,
    opset: int = OPSET,
) -> Path:
    graph = helper.make_graph(
        nodes,
        folder.name,
        [helper.make_tensor_value_info("x", elem, input_dims)],
        [helper.make_tensor_value_info("logits", elem, output_dims)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset > 9 else 4
    onnx.checker.check_model(model, full_check=True)
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    config = {
        "input": {"height": SIZE, "width": SIZE, "scale": 1 / 255, "mean": [0.5] * 3},
        "output": "logits",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "labels.txt").write_text("a\nb\nc\n")
    return folder


def _weights(dtype: type = np.float32) -> dict[str, Array]:
    return {"w": CONV_W.astype(dtype), "b": CONV_B.astype(dtype), "fc": FC_W.astype(dtype)}


def _head(features: str, pooled: str = "pool") -> list[onnx.NodeProto]:
    return [
        helper.make_node("GlobalAveragePool", [features], [pooled]),
        helper.make_node("Flatten", [pooled], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]


def plain_model(folder: Path) -> Path:
    """The clean reference: Pad 1 -> Conv 3x3 -> Relu -> GAP -> Gemm, free batch."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w", "b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        *_head("relu"),
    ]
    inits = {**_weights(), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    return _save(folder, nodes, inits, ["N", 3, SIZE, SIZE], ["N", 3])


def exported_model(folder: Path) -> Path:
    """The same network as an exporter writes it with free H and W: the pads computed from
    Shape arithmetic, an Identity, a Cast to float32 of a float32 tensor, and a Reshape whose
    target is computed from the batch."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
        helper.make_node("Sub", ["hw", "hw"], ["zeros"]),
        helper.make_node("Add", ["zeros", "one"], ["ones"]),
        helper.make_node("Concat", ["zero_pair", "ones", "zero_pair", "ones"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Identity", ["padded"], ["same"]),
        helper.make_node("Cast", ["same"], ["cast"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["cast", "w", "b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Shape", ["pool"], ["pool_shape"]),
        helper.make_node("Gather", ["pool_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axis"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    inits = {
        **_weights(),
        "two": np.array([2], np.int64),
        "four": np.array([4], np.int64),
        "one": np.array([1], np.int64),
        "zero_pair": np.array([0, 0], np.int64),
        "zero": np.array(0, np.int64),
        "zero_axis": np.array([0], np.int64),
        "minus_one": np.array([-1], np.int64),
    }
    return _save(folder, nodes, inits, ["N", 3, "height", "width"], ["N", 3])


def fixed_batch_model(folder: Path, *, rewritable: bool) -> Path:
    """Batch fixed at 1. With `rewritable` its only batch constant is a Reshape target; without,
    a constant [1, 1] column is concatenated to the features, which no free batch allows."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w", "b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"]),
    ]
    inits = {
        **_weights(),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "flat_shape": np.array([1, -1], np.int64),
    }
    if rewritable:
        nodes.append(helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1))
    else:
        inits["column"] = np.zeros((1, 1), np.float32)
        inits["fc5"] = np.concatenate([FC_W, np.ones((3, 1), np.float32)], axis=1)
        del inits["fc"]
        nodes += [
            helper.make_node("Concat", ["flat", "column"], ["wide"], axis=1),
            helper.make_node("Gemm", ["wide", "fc5"], ["logits"], transB=1),
        ]
    return _save(folder, nodes, inits, [1, 3, SIZE, SIZE], [1, 3])


def half_model(folder: Path) -> Path:
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w", "b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        *_head("relu"),
    ]
    inits = {**_weights(np.float16), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    return _save(folder, nodes, inits, ["N", 3, SIZE, SIZE], ["N", 3], TensorProto.FLOAT16)


def half_twin(folder: Path) -> Path:
    """float32 with the float16 model's rounded weights: the same function, computed wider."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w", "b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        *_head("relu"),
    ]
    rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in _weights().items()}
    inits: dict[str, Array] = {**rounded, "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    return _save(folder, nodes, inits, ["N", 3, SIZE, SIZE], ["N", 3])


def if_model(folder: Path) -> Path:
    """An If whose branches read the Conv's output from the outer scope."""
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["conv"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["conv"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "If",
            ["flag"],
            ["branch"],
            name="choose_branch",
            then_branch=then_branch,
            else_branch=else_branch,
        ),
        *_head("branch"),
    ]
    inits = {**_weights(), "flag": np.array(True)}
    return _save(folder, nodes, inits, ["N", 3, SIZE, SIZE], ["N", 3])


def silu_model(folder: Path) -> Path:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["conv"], ["gate"]),
        helper.make_node("Mul", ["conv", "gate"], ["silu"]),
        *_head("silu"),
    ]
    return _save(folder, nodes, _weights(), ["N", 3, SIZE, SIZE], ["N", 3])


def upsampling_model(folder: Path, *, old: bool) -> Path:
    """Conv -> Relu -> 2x nearest upsampling -> MaxPool -> GAP -> Gemm; `old`: opset 9's
    Upsample, which normalisation converts to a Resize (asymmetric, floor), else that Resize."""
    if old:
        upsample = helper.make_node("Upsample", ["relu", "scales"], ["up"], mode="nearest")
    else:
        upsample = helper.make_node(
            "Resize",
            ["relu", "", "scales"],
            ["up"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        upsample,
        helper.make_node("MaxPool", ["up"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2]),
        *_head("pooled"),
    ]
    nodes[-1].input.append("fc_b")  # (Gemm's C is optional from opset 11 on)
    inits = {**_weights(), "scales": np.array([1, 1, 2, 2], np.float32), "fc_b": FC_B}
    return _save(folder, nodes, inits, ["N", 3, SIZE, SIZE], ["N", 3], opset=9 if old else 17)


def batch_shaped_model(folder: Path, *, exported: bool) -> Path:
    """Conv -> Relu -> 2x Resize -> channel means through the flattened batch -> Gemm.

    `exported` writes it the way torch does: the Resize's sizes are Concat(Shape(x)[:2], [h, w])
    and the channel means are read back with dynamo's as_strided, a Gather over the flattened
    batch at n * C + c. The twin says sizes as scales and pools with GlobalAveragePool.
    """
    channels = 4
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
    ]
    inits: dict[str, Array] = {**_weights()}
    if exported:
        nodes += [
            helper.make_node("Shape", ["relu"], ["relu_shape"]),
            helper.make_node("Slice", ["relu_shape", "zero1", "two1"], ["batch_channels"]),
            helper.make_node("Concat", ["batch_channels", "hw"], ["sizes"], axis=0),
            helper.make_node("Resize", ["relu", "", "", "sizes"], ["up"], mode="linear"),
            helper.make_node("GlobalAveragePool", ["up"], ["pool"]),
            helper.make_node("Reshape", ["pool", "minus_one"], ["flat_all"]),
            helper.make_node("Shape", ["x"], ["x_shape"], end=1),
            helper.make_node("Squeeze", ["x_shape"], ["batch"]),
            helper.make_node("Range", ["zero", "batch", "one"], ["rows"]),
            helper.make_node("Mul", ["rows", "row_size"], ["row_starts"]),
            helper.make_node("Unsqueeze", ["row_starts", "axis1"], ["row_starts2"]),
            helper.make_node("Add", ["row_starts2", "channel_ids"], ["positions"]),
            helper.make_node("Gather", ["flat_all", "positions"], ["flat"], axis=0),
        ]
        inits.update(
            zero1=np.array([0], np.int64),
            two1=np.array([2], np.int64),
            hw=np.array([2 * SIZE, 2 * SIZE], np.int64),
            minus_one=np.array([-1], np.int64),
            zero=np.array(0, np.int64),
            one=np.array(1, np.int64),
            row_size=np.array(channels, np.int64),
            axis1=np.array([1], np.int64),
            channel_ids=np.arange(channels, dtype=np.int64)[None],
        )
    else:
        nodes += [
            helper.make_node("Resize", ["relu", "", "scales"], ["up"], mode="linear"),
            helper.make_node("GlobalAveragePool", ["up"], ["pool"]),
            helper.make_node("Flatten", ["pool"], ["flat"]),
        ]
        inits["scales"] = np.array([1, 1, 2, 2], np.float32)
    nodes.append(helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1))
    return _save(folder, nodes, inits, ["N", 3, SIZE, SIZE], ["N", 3], opset=OPSET)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("normalize")
    plain_model(root / "plain")
    exported_model(root / "exported")
    fixed_batch_model(root / "fixed-rewritable", rewritable=True)
    fixed_batch_model(root / "fixed-stuck", rewritable=False)
    half_model(root / "half")
    half_twin(root / "half-twin")
    if_model(root / "if")
    silu_model(root / "silu")
    normalized_model(root / "normalized")
    upsampling_model(root / "upsample-9", old=True)
    upsampling_model(root / "resize-17", old=False)
    batch_shaped_model(root / "batch-shaped", exported=True)
    batch_shaped_model(root / "batch-shaped-twin", exported=False)
    with make_client(root, max_batch=4) as client:
        yield client


def _image(seed: int = 5) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", pixels)
    assert ok
    return base64.b64encode(png.tobytes()).decode()


def _explain(
    client: TestClient, model: str, method: str, status: int = 200, **extra: Any
) -> dict[str, Any]:
    body = {
        "image": _image(),
        "method": method,
        "targets": [1],
        "output": {"format": "array", "normalize": "none", "size": "model"},
        **extra,
    }
    response = client.post(f"/v1/models/{model}/explain", json=body)
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _map(answer: dict[str, Any]) -> Array:
    heatmap = answer["explanations"][0]["heatmap"]
    return np.frombuffer(base64.b64decode(heatmap["data"]), np.float32).reshape(heatmap["shape"])


GRADIENT_METHODS = ["saliency", "gradcam", "guided_backprop", "integrated_gradients"]


@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "smoothgrad", "occlusion"])
def test_batch_shaped_exports_explain_like_their_twin(client: TestClient, method: str) -> None:
    params = {"samples": 4, "seed": 2} if method == "smoothgrad" else {}
    served = _map(_explain(client, "batch-shaped", method, params=params))
    twin = _map(_explain(client, "batch-shaped-twin", method, params=params))

    assert np.abs(twin).max() > 0
    np.testing.assert_allclose(served, twin, rtol=1e-5, atol=1e-6)


# --- normalisation on its own ----------------------------------------------------------------


def test_free_dims_are_fixed_and_shape_arithmetic_is_folded(tmp_path: Path) -> None:
    model = onnx.load(str(exported_model(tmp_path / "m") / "model.onnx"))

    normalized = normalize(model, "x", {2: SIZE, 3: SIZE})

    ops = [n.op_type for n in normalized.model.graph.node]
    assert "Identity" not in ops
    assert "Cast" not in ops
    assert "Shape" not in ops  # the batch-dependent Reshape target became [0, -1]
    reshape = next(n for n in normalized.model.graph.node if n.op_type == "Reshape")
    target = next(i for i in normalized.model.graph.initializer if i.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, -1]
    pad = next(n for n in normalized.model.graph.node if n.op_type == "Pad")
    pads = next(i for i in normalized.model.graph.initializer if i.name == pad.input[1])
    assert numpy_helper.to_array(pads).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    dims = normalized.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, SIZE, SIZE]
    assert normalized.batch == "free"


def test_shapes_computed_from_the_batch_become_batch_free(tmp_path: Path) -> None:
    model = onnx.load(str(batch_shaped_model(tmp_path / "m", exported=True) / "model.onnx"))

    normalized = normalize(model, "x", {2: SIZE, 3: SIZE}).model

    ops = [n.op_type for n in normalized.graph.node]
    assert "Shape" not in ops
    assert "Range" not in ops
    resize = next(n for n in normalized.graph.node if n.op_type == "Resize")
    scales = next(i for i in normalized.graph.initializer if i.name == resize.input[2])
    assert numpy_helper.to_array(scales).tolist() == [1, 1, 2, 2]  # (opset 17: no Resize axes)
    gather = next(n for n in normalized.graph.node if n.op_type == "Gather")
    assert [a.i for a in gather.attribute if a.name == "axis"] == [1]


# --- through the service ---------------------------------------------------------------------


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_a_free_height_and_width_export_explains_like_its_static_twin(
    client: TestClient, method: str
) -> None:
    served = _map(_explain(client, "exported", method))
    twin = _map(_explain(client, "plain", method))

    assert np.abs(twin).max() > 0
    np.testing.assert_allclose(served, twin, rtol=1e-5, atol=1e-6)


def test_model_info_says_how_the_batch_runs(client: TestClient) -> None:
    batches = {
        name: client.get(f"/v1/models/{name}").json()["batch"]
        for name in ("plain", "fixed-rewritable", "fixed-stuck")
    }

    assert batches == {"plain": "free", "fixed-rewritable": "rewritten", "fixed-stuck": "one_row"}


@pytest.mark.parametrize("name", ["fixed-rewritable", "fixed-stuck"])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("saliency", {}),
        ("gradcam", {}),
        ("smoothgrad", {"samples": 5, "seed": 1}),
        ("integrated_gradients", {"steps": 6}),
        ("occlusion", {"window": 8, "stride": 4}),
    ],
)
def test_a_fixed_batch_model_serves_batched_methods(
    client: TestClient, name: str, method: str, params: dict[str, Any]
) -> None:
    served = _map(_explain(client, name, method, params=params))
    if name == "fixed-rewritable":  # the same function as the free-batch twin
        np.testing.assert_allclose(
            served, _map(_explain(client, "plain", method, params=params)), rtol=1e-4, atol=1e-6
        )
    assert np.isfinite(served).all()
    assert np.abs(served).max() > 0


@pytest.mark.parametrize("name", ["fixed-rewritable", "fixed-stuck"])
def test_a_fixed_batch_model_answers_concurrent_requests(client: TestClient, name: str) -> None:
    def call(index: int) -> int:
        if index % 3 == 0:
            body = {"image": _image(index), "top_k": 2}
            return client.post(f"/v1/models/{name}/predict", json=body).status_code
        method = "gradcam" if index % 3 == 1 else "saliency"
        body = {"image": _image(index), "method": method, "top_k": 1}
        return client.post(f"/v1/models/{name}/explain", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(call, range(15)))

    assert statuses == [200] * 15


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_an_opset_9_model_is_converted_once_for_every_session(
    client: TestClient, method: str
) -> None:
    info = client.get("/v1/models/upsample-9").json()
    assert "relu" in [layer["name"] for layer in info["layers"]]

    old = _map(
        _explain(client, "upsample-9", method, params={"layer": "relu"} if "cam" in method else {})
    )
    new = _map(
        _explain(client, "resize-17", method, params={"layer": "relu"} if "cam" in method else {})
    )

    assert np.abs(new).max() > 0
    np.testing.assert_allclose(old, new, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_a_float16_model_gets_float32_gradients(client: TestClient, method: str) -> None:
    served = _map(_explain(client, "half", method))
    twin = _map(_explain(client, "half-twin", method))

    np.testing.assert_allclose(served, twin, rtol=1e-5, atol=1e-6)


def test_an_if_node_reading_the_differentiated_path_is_refused_by_name(client: TestClient) -> None:
    answer = _explain(client, "if", "saliency", status=422)

    assert answer["error"]["code"] == "unsupported_model"
    assert "If node 'choose_branch'" in answer["error"]["message"]


def test_guided_backprop_without_relus_is_refused(client: TestClient) -> None:
    for method in ("guided_backprop", "guided_gradcam"):
        answer = _explain(client, "silu", method, status=422)
        assert "ReLU-like" in answer["error"]["message"]
    assert np.abs(_map(_explain(client, "silu", "saliency"))).max() > 0


@pytest.mark.parametrize(
    ("dims", "reason"),
    [
        ([1, 3, 2 * SIZE, 2 * SIZE], f"fixed at 3x{2 * SIZE}x{2 * SIZE} per image"),
        (["N", SIZE, SIZE, 3], f"fixed at {SIZE}x{SIZE}x3 per image"),
    ],
)
def test_a_model_whose_input_disagrees_with_its_config_is_refused_at_load(
    tmp_path: Path, dims: list[Any], reason: str
) -> None:
    from engines.errors import InvalidModel
    from engines.models.loaded import LoadedModel
    from tests.conftest import CPU

    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    features = int(np.prod(dims[1:]))
    weights = {"fc": np.zeros((3, features), np.float32)}
    folder = _save(tmp_path / "m", nodes, weights, dims, [dims[0], 3])

    with pytest.raises(InvalidModel, match=reason):
        LoadedModel("m", folder, CPU)


@pytest.mark.parametrize("with_default", [False, True])
def test_an_input_besides_the_image_is_refused_at_load_unless_an_initializer_backs_it(
    tmp_path: Path, with_default: bool
) -> None:
    """As Keras 3's TensorFlow-backend export writes a Normalization layer: its mean is a graph
    input. Without an initializer behind it every run would fail, so the model must not load;
    with one (an overridable initializer) it is a constant and the model serves."""
    from engines.errors import InvalidModel
    from engines.models.loaded import LoadedModel
    from tests.conftest import CPU

    dims = ["N", 3, SIZE, SIZE]
    features = 3 * SIZE * SIZE
    weights = np.random.default_rng(0).normal(size=(3, features)).astype(np.float32)
    shift = np.array([0.25, -0.5, 1.0], np.float32).reshape(1, 3, 1, 1)
    nodes = [
        helper.make_node("Sub", ["x", "shift"], ["centred"]),
        helper.make_node("Flatten", ["centred"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    folder = _save(tmp_path / "m", nodes, {"shift": shift, "fc": weights}, dims, ["N", 3])
    model = onnx.load(str(folder / "model.onnx"))
    model.graph.input.append(helper.make_tensor_value_info("shift", TensorProto.FLOAT, shift.shape))
    if not with_default:
        kept = [i for i in model.graph.initializer if i.name != "shift"]
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(kept)
    onnx.save(model, str(folder / "model.onnx"))

    if not with_default:
        with pytest.raises(
            InvalidModel, match=r"besides the image 'x' that nothing feeds: 'shift'"
        ):
            LoadedModel("m", folder, CPU)
        return
    loaded = LoadedModel("m", folder, CPU)
    image = np.random.default_rng(1).random((1, 3, SIZE, SIZE)).astype(np.float32)
    expected = (image - shift).reshape(1, -1) @ weights.T
    np.testing.assert_allclose(loaded.forward(image), expected, rtol=1e-5, atol=1e-5)


# --- the support table -----------------------------------------------------------------------


def _support(client: TestClient, model: str) -> dict[str, str | None]:
    methods = client.get(f"/v1/models/{model}").json()["methods"]
    return {m["method"]: None if m["supported"] else m["reason"] for m in methods}


def test_model_info_lists_every_method_supported_on_a_plain_cnn(client: TestClient) -> None:
    from engines.methods.registry import EXPLAINERS

    support = _support(client, "plain")

    assert set(support) == set(EXPLAINERS)
    assert all(reason is None for reason in support.values())


def test_model_info_names_what_a_model_lacks(client: TestClient) -> None:
    silu, branching = _support(client, "silu"), _support(client, "if")

    assert "ReLU-like" in str(silu["guided_backprop"])
    assert "ReLU-like" in str(silu["guided_gradcam"])
    assert silu["saliency"] is None
    assert silu["gradcam"] is None
    assert "If node 'choose_branch'" in str(branching["saliency"])
    assert "If node 'choose_branch'" in str(branching["gradcam"])
    assert branching["occlusion"] is None


def test_prepare_prints_the_support_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    silu_model(tmp_path / "silu")

    assert main(["prepare", "silu", "--repository", str(tmp_path)]) == 0

    printed = capsys.readouterr().out
    assert "batch free" in printed
    assert "guided_backprop" in printed
    assert "unsupported: guided backprop needs a ReLU-like op" in printed
    assert any(
        line.strip().startswith("saliency") and "supported" in line for line in printed.splitlines()
    )
    assert list((tmp_path / "silu" / "gradients").glob("*guided*")) == []


def test_a_zero_pad_before_a_max_pool_keeps_its_zeros(tmp_path: Path) -> None:
    """onnxruntime's Pad_Fusion would move the Pad into the MaxPool, which pads with -inf: on
    feature maps below zero (here everywhere: the bias is -10) every border window changes."""
    import onnxruntime as ort

    from engines.models.loaded import LoadedModel
    from engines.runtime.session import RuntimeOptions

    weights = {**_weights(), "b": np.full(4, -10.0, np.float32)}
    weights["pads"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["conv", "pads"], ["padded"]),
        helper.make_node("MaxPool", ["padded"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2]),
        *_head("pooled"),
    ]
    folder = _save(tmp_path / "pad-pool", nodes, weights, ["N", 3, SIZE, SIZE], ["N", 3])
    x = RNG.normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(folder / "model.onnx"), plain).run(None, {"x": x})[0]
    fused = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"x": x})[0]
    assert np.abs(fused - reference).max() > 1e-2  # what the rewrite guards against

    model = LoadedModel("pad-pool", folder, RuntimeOptions(providers="cpu"), cache_dir=tmp_path)
    np.testing.assert_allclose(model.forward(x), reference, rtol=1e-5, atol=1e-5)


# --- batch bookkeeping of attention and patch blocks ------------------------------------------


def _ints(*values: int) -> Array:
    return np.array(values, np.int64)


def _served_input_gradient(folder: Path, tmp_path: Path, x: Array, seeds: Array) -> Array:
    """The served model's input gradient of sum(seeds * logits), one row per image."""
    from engines.graphs.prepared import GraphKey
    from engines.models.loaded import LoadedModel
    from engines.runtime.session import RuntimeOptions

    model = LoadedModel(folder.name, folder, RuntimeOptions(providers="cpu"), cache_dir=tmp_path)
    key = GraphKey(None, wrt_input=True, guided=False, top_k_seeds=False, paired=True)
    result = model.gradients.run(key, model.input_name, x, seeds=seeds)
    assert result.grad_input is not None
    return result.grad_input


def _check_against_finite_differences(folder: Path, tmp_path: Path) -> None:
    from tests.test_gradients import numeric_gradient

    x = RNG.normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    seeds = RNG.normal(size=(2, 3)).astype(np.float32)
    served = _served_input_gradient(folder, tmp_path, x, seeds)
    expected = numeric_gradient(onnx.load(str(folder / "model.onnx")), x, seeds)
    np.testing.assert_allclose(served, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_attention_that_splits_q_k_v_along_a_leading_axis_keeps_the_batch_first(
    tmp_path: Path,
) -> None:
    """`qkv.reshape(B, T, 3, ...).permute(2, 0, ...).unbind(0)`: the Transpose puts the batch
    second; its readers (Slice + Squeeze, Gather, Split + Squeeze) select along axis 0."""
    weights = {
        **_weights(),
        "w": RNG.normal(size=(6, 3, 3, 3)).astype(np.float32),
        "b": RNG.normal(size=6).astype(np.float32) * 0.1,
        "fc": RNG.normal(size=(3, 2)).astype(np.float32),
        "qkv_shape": _ints(-1, 3, 2, SIZE * SIZE),
        "maps": _ints(0, 2, SIZE, SIZE),
        "zero": _ints(0),
        "one": _ints(1),
        "second": np.array(1, np.int64),
        "thirds": _ints(1, 1, 1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["conv", "qkv_shape"], ["qkv"]),
        helper.make_node("Transpose", ["qkv"], ["heads"], perm=[1, 0, 2, 3]),  # [3, N, 2, T]
        helper.make_node("Slice", ["heads", "zero", "one", "zero"], ["q1"]),
        helper.make_node("Squeeze", ["q1", "zero"], ["q"]),
        helper.make_node("Gather", ["heads", "second"], ["k"], axis=0),
        helper.make_node("Split", ["heads", "thirds"], ["s0", "s1", "s2"], axis=0),
        helper.make_node("Squeeze", ["s2", "zero"], ["v"]),
        helper.make_node("Mul", ["q", "k"], ["qk"]),
        helper.make_node("Add", ["qk", "v"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "maps"], ["mapped"]),
        *_head("mapped"),
    ]
    folder = _save(tmp_path / "qkv", nodes, weights, ["N", 3, SIZE, SIZE], ["N", 3])

    normalized = normalize(onnx.load(str(folder / "model.onnx")), "x", {2: SIZE, 3: SIZE})
    transpose = next(n for n in normalized.model.graph.node if n.op_type == "Transpose")
    assert list(helper.get_attribute_value(transpose.attribute[0])) == [0, 1, 2, 3]
    _check_against_finite_differences(folder, tmp_path)


def test_patches_that_merge_the_batch_into_axis_0_have_static_rows(tmp_path: Path) -> None:
    """MobileViT's unfold and fold: [N, C, H, W] -> [N * C * H, W] -> [N, C, H, -1], shapes
    computed from the batch. Symbolic inference leaves the last -1 unknown."""
    weights = {
        **_weights(),
        "rows_per_image": np.array(4 * SIZE, np.int64),
        "batch_at": np.array(0, np.int64),
        "axis0": _ints(0),
        "width": _ints(SIZE),
        "rest": _ints(4, SIZE, -1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["conv"], ["shape"]),
        helper.make_node("Gather", ["shape", "batch_at"], ["batch"], axis=0),
        helper.make_node("Mul", ["batch", "rows_per_image"], ["rows"]),
        helper.make_node("Unsqueeze", ["rows", "axis0"], ["rows_1d"]),
        helper.make_node("Concat", ["rows_1d", "width"], ["patch_shape"], axis=0),
        helper.make_node("Reshape", ["conv", "patch_shape"], ["patches"]),
        helper.make_node("Softmax", ["patches"], ["weights"], axis=-1),
        helper.make_node("Mul", ["patches", "weights"], ["attended"]),
        helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch_1d"]),
        helper.make_node("Concat", ["batch_1d", "rest"], ["map_shape"], axis=0),
        helper.make_node("Reshape", ["attended", "map_shape"], ["folded"]),
        helper.make_node("Transpose", ["folded"], ["turned"], perm=[0, 1, 3, 2]),
        *_head("turned"),
    ]
    folder = _save(tmp_path / "patches", nodes, weights, ["N", 3, SIZE, SIZE], ["N", 3])
    _check_against_finite_differences(folder, tmp_path)


def test_resizes_after_broadcasts_keep_the_batch(tmp_path: Path) -> None:
    """GhostNetV2's gates: pool, resize back to Shape(x) and multiply, twice. Each product gets
    a fresh batch symbol from shape inference, and the next Resize's sizes come from it."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["m0"], pads=[1, 1, 1, 1])]
    for i in (1, 2):
        nodes += [
            helper.make_node(
                "AveragePool", [f"m{i - 1}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]
            ),
            helper.make_node("Sigmoid", [f"p{i}"], [f"g{i}"]),
            helper.make_node("Shape", [f"m{i - 1}"], [f"s{i}"]),
            helper.make_node("Resize", [f"g{i}", "", "", f"s{i}"], [f"r{i}"], mode="nearest"),
            helper.make_node("Mul", [f"m{i - 1}", f"r{i}"], [f"m{i}"]),
        ]
    nodes += _head("m2")
    folder = _save(tmp_path / "gates", nodes, _weights(), ["N", 3, SIZE, SIZE], ["N", 3])
    _check_against_finite_differences(folder, tmp_path)


def test_a_clip_that_keeps_a_norm_off_zero_is_no_relu_for_guided_backprop(
    client: TestClient,
) -> None:
    """F.normalize divides by clamp_min(norm, eps), a Clip with a lower bound only; guided
    backprop has no activation to filter at, as torch's has not."""
    answer = _explain(client, "normalized", "guided_backprop", status=422)
    assert "ReLU-like" in answer["error"]["message"]
    assert np.abs(_map(_explain(client, "normalized", "saliency"))).max() > 0


def normalized_model(folder: Path) -> Path:
    """x / clamp_min(||x||_2 over channels, 1e-12) -> Conv -> Tanh -> GAP -> Gemm."""
    weights = {**_weights(), "eps": np.array(1e-12, np.float32)}
    nodes = [
        helper.make_node("ReduceL2", ["x"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Clip", ["norm", "eps"], ["kept"]),
        helper.make_node("Div", ["x", "kept"], ["unit"]),
        helper.make_node("Conv", ["unit", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["conv"], ["act"]),
        *_head("act"),
    ]
    return _save(folder, nodes, weights, ["N", 3, SIZE, SIZE], ["N", 3])


def test_adaptive_pooling_written_as_a_gather_of_index_pairs_keeps_the_batch_first(
    tmp_path: Path,
) -> None:
    """The dynamo exporter's adaptive average pooling 4x4 -> 3x3: Transpose to [H, W, N, C],
    GatherND of (h, w) pairs, Transpose back, mean over each window's taps."""
    window = np.array([[0, 1], [1, 2], [2, 3]])  # rows (and columns) of each output's window
    pairs = np.stack(np.broadcast_arrays(window[:, :, None, None], window[None, None]), -1)
    weights = {**_weights(), "pairs": pairs.astype(np.int64), "taps": _ints(3, 5)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["conv"], ["small"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Transpose", ["small"], ["spatial_first"], perm=[2, 3, 0, 1]),
        helper.make_node("GatherND", ["spatial_first", "pairs"], ["picked"]),
        helper.make_node("Transpose", ["picked"], ["windows"], perm=[4, 5, 0, 1, 2, 3]),
        helper.make_node("ReduceMean", ["windows", "taps"], ["pooled"], keepdims=0),
        *_head("pooled", "gap"),
    ]
    folder = _save(tmp_path / "adaptive", nodes, weights, ["N", 3, SIZE, SIZE], ["N", 3], opset=18)

    normalized = normalize(onnx.load(str(folder / "model.onnx")), "x", {2: SIZE, 3: SIZE})
    assert "GatherND" not in {n.op_type for n in normalized.model.graph.node}
    _check_against_finite_differences(folder, tmp_path)


def test_an_output_of_pooled_class_maps_is_flattened_for_gradients(tmp_path: Path) -> None:
    """A convolutional head pooled straight to the output, [N, classes, 1, 1] (the ONNX model
    zoo's SqueezeNet): the gradient graphs read it as [N, classes]."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Conv", ["relu", "head"], ["class_maps"]),
        helper.make_node("GlobalAveragePool", ["class_maps"], ["logits"]),
    ]
    weights = {**_weights(), "head": RNG.normal(size=(3, 4, 1, 1)).astype(np.float32)}
    del weights["fc"]
    folder = _save(tmp_path / "maps", nodes, weights, ["N", 3, SIZE, SIZE], ["N", 3, 1, 1])
    normalized = normalize(onnx.load(str(folder / "model.onnx")), "x", {2: SIZE, 3: SIZE})
    (output,) = normalized.model.graph.output
    assert len(output.type.tensor_type.shape.dim) == 2
    _check_against_finite_differences(folder, tmp_path)
