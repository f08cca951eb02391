"""method "cam": the original CAM of GAP + linear heads, proportional to Grad-CAM there."""

import base64
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from engines.errors import UnsupportedModel
from engines.graphs.heads import find_cam_head
from tests.conftest import make_client
from tests.images import encode, photo
from tests.tiny_models import OPSET, write_model_folder


def red_square_png(size: int = 32) -> bytes:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[4:14, 18:28] = (220, 0, 0)
    image[20:30, 2:12] = (90, 200, 40)
    return encode(image)


def explain(client: TestClient, model: str, method: str, image: bytes, **fields: Any) -> Any:
    body = {
        "image": base64.b64encode(image).decode(),
        "method": method,
        "output": {"format": "array", "normalize": "none", "size": "model"},
        **fields,
    }
    response = client.post(f"/v1/models/{model}/explain", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def maps(answer: Any) -> dict[int, np.ndarray]:
    found = {}
    for explanation in answer["explanations"]:
        heatmap = explanation["heatmap"]
        values = np.frombuffer(base64.b64decode(heatmap["data"]), "<f4")
        found[explanation["target"]] = values.reshape(heatmap["shape"]).astype(np.float64)
    return found


def minmax(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    assert span > 0
    normalized: np.ndarray = (values - values.min()) / span
    return normalized


def assert_proportional(cam: dict[int, np.ndarray], gradcam: dict[int, np.ndarray]) -> None:
    assert cam.keys() == gradcam.keys()
    for target in cam:
        np.testing.assert_allclose(minmax(cam[target]), minmax(gradcam[target]), atol=1e-4)


def test_cam_equals_gradcam_up_to_scale_on_the_tiny_cnn(tiny_client: TestClient) -> None:
    image = red_square_png()
    fields = {"targets": [0, 1]}
    cam = explain(tiny_client, "tiny", "cam", image, **fields)
    gradcam = explain(tiny_client, "tiny", "gradcam", image, **fields)
    assert cam["predictions"] == gradcam["predictions"]
    assert_proportional(maps(cam), maps(gradcam))


def test_cam_equals_gradcam_up_to_scale_on_efficientnet(client: TestClient) -> None:
    image = encode(photo("chelsea"))
    cam = explain(client, "efficientnet-lite0", "cam", image, top_k=2)
    gradcam = explain(client, "efficientnet-lite0", "gradcam", image, top_k=2)
    assert [e["target"] for e in cam["explanations"]] == [
        e["target"] for e in gradcam["explanations"]
    ]
    assert_proportional(maps(cam), maps(gradcam))


def _save(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], path: Path) -> None:
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def conv_flatten_gemm(path: Path) -> None:
    """Conv -> Flatten -> Gemm: a linear head, but no global average pooling."""
    rng = np.random.default_rng(1)
    _save(
        [
            helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Flatten", ["conv"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
        ],
        [
            numpy_helper.from_array(rng.normal(size=(2, 3, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(size=(3, 512)).astype(np.float32), "fc"),
        ],
        path,
    )


def test_a_model_without_gap_and_linear_gets_422(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "flat")
    conv_flatten_gemm(folder / "model.onnx")
    with make_client(tmp_path) as client:
        response = client.post(
            "/v1/models/flat/explain",
            json={"image": base64.b64encode(red_square_png()).decode(), "method": "cam"},
        )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_model"
    assert "global average pooling" in error["message"]


def test_matmul_add_after_reduce_mean_is_a_cam_head(tmp_path: Path) -> None:
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    _save(
        [
            helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("ReduceMean", ["conv"], ["pool"], axes=[2, 3], keepdims=1),
            helper.make_node("Squeeze", ["pool", "axes"], ["flat"]),
            helper.make_node("MatMul", ["flat", "fc"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        [
            numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
            numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
            numpy_helper.from_array(weight, "fc"),
            numpy_helper.from_array(np.zeros(3, np.float32), "b"),
        ],
        tmp_path / "m.onnx",
    )
    head = find_cam_head(onnx.load(str(tmp_path / "m.onnx")), "logits")
    assert head.feature == "conv"
    assert head.channel_axis == 1
    np.testing.assert_array_equal(head.weights, weight.T)


def test_a_head_without_a_linear_layer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["logits"], axes=[2, 3], keepdims=0)],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedModel, match="Gemm or MatMul"):
        find_cam_head(onnx.load(str(path)), "logits")
