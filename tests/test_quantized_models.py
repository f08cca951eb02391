"""A quantized (QDQ) model: forward methods serve it; gradient methods refuse it with a 422 that
names the QuantizeLinear node the gradient cannot pass, never a 500 or a wrong map."""

import base64
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from engines.errors import UnsupportedModel
from engines.graphs import GradientSpec, build_gradient_model
from tests.conftest import make_client
from tests.tiny_models import write_model_folder

SIZE = 16


@pytest.fixture(scope="module")
def quantized_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("quantized")
    write_model_folder(root / "q", "quantized_cnn", size=SIZE)
    with make_client(root) as client:
        yield client


def _solid(color_bgr: tuple[int, int, int]) -> str:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:] = color_bgr
    ok, png = cv2.imencode(".png", image)
    assert ok
    return base64.b64encode(png.tobytes()).decode()


def test_the_gradient_names_the_quantize_node_it_cannot_pass(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "q", "quantized_cnn", size=SIZE)
    model = onnx.load(str(folder / "model.onnx"))
    with pytest.raises(UnsupportedModel, match=r"QuantizeLinear node 'x_Q'.*int8.*quantized"):
        build_gradient_model(model, GradientSpec(output="logits", wrt_input=True))
    # Grad-CAM's layer sits after the first pair; the second blocks it
    with pytest.raises(UnsupportedModel, match=r"QuantizeLinear node 'relu_Q'"):
        build_gradient_model(model, GradientSpec(output="logits", layer="conv"))


def test_a_quantized_model_serves_forward_methods_and_refuses_gradients(
    quantized_client: TestClient,
) -> None:
    info = quantized_client.get("/v1/models/q").json()
    assert info["ready"]
    assert all("_q" not in layer["name"] for layer in info["layers"]), "int8 maps are no layers"
    support = {entry["method"]: entry for entry in info["methods"]}
    assert support["occlusion"]["supported"]
    assert not support["saliency"]["supported"]
    assert "QuantizeLinear node 'x_Q'" in support["saliency"]["reason"]

    red = _solid((0, 0, 255))
    # the default layer comes after the last quantized pair: a real gradient reaches it
    assert info["default_layer"] == "relu_dq"
    output = {"format": "array", "normalize": "none", "size": "model"}
    body = {"image": red, "method": "gradcam", "output": output}
    response = quantized_client.post("/v1/models/q/explain", json=body)
    assert response.status_code == 200, response.text
    # red 255 saturates int8 at 127/64 in channel 0; its weight is d(mean)/d(pixel) = 1/256
    heatmap = response.json()["explanations"][0]["heatmap"]
    cam = np.frombuffer(base64.b64decode(heatmap["data"]), dtype="<f4")
    assert heatmap["shape"] == [SIZE, SIZE]
    np.testing.assert_allclose(cam, 127 / 64 / SIZE**2, rtol=1e-6)
    for method, params in (
        ("saliency", {}),
        ("integrated_gradients", {}),
        ("gradcam", {"layer": "conv"}),
    ):
        response = quantized_client.post(
            "/v1/models/q/explain", json={"image": red, "method": method, "params": params}
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "unsupported_model"
        assert "QuantizeLinear" in error["message"]
    response = quantized_client.post(
        "/v1/models/q/explain",
        json={"image": red, "method": "occlusion", "params": {"window": 4, "stride": 4}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "red"
