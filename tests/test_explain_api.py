"""POST /v1/models/{name}/explain over real HTTP against the tiny CNN."""

import base64
import json
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.images import encode

URL = "/v1/models/tiny/explain"


def red_square_png(size: int = 32) -> bytes:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[4:14, 18:28] = (220, 0, 0)
    return encode(image)


def body(**fields: object) -> dict[str, object]:
    return {"image": base64.b64encode(red_square_png()).decode(), "method": "gradcam", **fields}


def decode_array(heatmap: dict[str, Any]) -> np.ndarray:
    shape = tuple(heatmap["shape"])
    return np.frombuffer(base64.b64decode(str(heatmap["data"])), "<f4").reshape(shape)


@pytest.mark.parametrize(
    "method",
    [
        "gradcam",
        "gradcam++",
        "xgradcam",
        "layercam",
        "hirescam",
        "guided_gradcam",
        "saliency",
        "guided_backprop",
        "smoothgrad",
        "integrated_gradients",
        "gradient_x_input",
    ],
)
def test_every_method_answers_with_a_map_on_the_square(
    tiny_client: TestClient, method: str
) -> None:
    response = tiny_client.post(URL, json=body(method=method, output={"format": "array"}))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["method"] == method
    assert answer["predictions"][0]["label"] == "red"
    (explanation,) = answer["explanations"]
    assert (explanation["target"], explanation["label"]) == (0, "red")
    heatmap = decode_array(explanation["heatmap"])
    assert heatmap.shape == (32, 32)
    inside = heatmap[4:14, 18:28].mean()
    outside = np.abs(heatmap[20:, :12]).mean()
    # Any noise opens the ReLU on half of the exactly-black pixels: SmoothGrad sees 1/2 there.
    assert inside > (1.5 if method == "smoothgrad" else 5) * outside


def test_png_output_at_model_size_and_several_targets(tiny_client: TestClient) -> None:
    response = tiny_client.post(
        URL, json=body(targets=["red", 2], output={"format": "png", "size": "model"})
    )
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    assert [e["target"] for e in explanations] == [0, 2]
    pixels = cv2.imdecode(
        np.frombuffer(base64.b64decode(explanations[0]["heatmap"]["data"]), np.uint8),
        cv2.IMREAD_UNCHANGED,
    )
    assert pixels is not None
    assert pixels.shape == (16, 16)
    assert pixels.max() == 255


def test_multipart_explain(tiny_client: TestClient) -> None:
    response = tiny_client.post(
        URL,
        files={"image": ("sq.png", red_square_png(), "image/png")},
        data={"method": "saliency", "targets": "[0]", "params": json.dumps({"reduction": "sum"})},
    )
    assert response.status_code == 200, response.text
    assert response.json()["explanations"][0]["label"] == "red"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"method": "magic"}, "invalid_request"),
        ({"params": {"layer": "nope"}}, "invalid_parameters"),
        ({"params": {"window": 3}}, "invalid_request"),
        ({"method": "smoothgrad", "params": {"samples": 100000}}, "invalid_request"),
        ({"targets": ["purple"]}, "invalid_parameters"),
        ({"targets": [3]}, "invalid_parameters"),
        ({"targets": [-1]}, "invalid_parameters"),
        ({"top_k": 0}, "invalid_request"),
        ({"output": {"format": "gif"}}, "invalid_request"),
    ],
)
def test_bad_explain_requests_are_422(
    tiny_client: TestClient, fields: dict[str, object], code: str
) -> None:
    response = tiny_client.post(URL, json=body(**fields))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert tiny_client.post(URL, json=body()).status_code == 200


def test_explain_on_unknown_and_broken_models(tiny_client: TestClient) -> None:
    assert tiny_client.post("/v1/models/nope/explain", json=body()).status_code == 404
    assert tiny_client.post("/v1/models/broken/explain", json=body()).status_code == 503
