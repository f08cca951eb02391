"""POST /v1/models/{name}/maximize: gradient ascent on the input of a class score."""

import base64
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from engines.insight.maximize import to_pixels, to_tensor, valid_range
from schemas.model_config import InputSpec
from tests.conftest import make_client
from tests.tiny_models import OPSET, write_model_folder

SIZE = 8
URL = "/v1/models/linear/maximize"
PLAIN = {"l2_decay": 0.0, "blur_every": 0, "jitter": 0, "clip": False, "array": True}


def weight_row() -> np.ndarray:
    return np.random.default_rng(3).normal(size=3 * SIZE * SIZE).astype(np.float32)


def linear_model(path: Path) -> None:
    """Flatten -> Gemm: class 0's score is w . x, class 1's is 0."""
    weights = np.stack([weight_row(), np.zeros(3 * SIZE * SIZE, np.float32)])
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(weights, "fc")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def linear_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("linear")
    folder = write_model_folder(root / "linear", size=SIZE, scale=1 / 255, labels=("w", "zero"))
    linear_model(folder / "model.onnx")
    with make_client(root) as client:
        yield client


def tensor_of(answer: dict[str, Any]) -> np.ndarray:
    array = answer["array"]
    return np.frombuffer(base64.b64decode(array["data"]), "<f4").reshape(array["shape"])


def test_plain_ascent_moves_along_w_and_raises_the_score(linear_client: TestClient) -> None:
    response = linear_client.post(
        URL, json={"target": 0, "steps": 20, "learning_rate": 0.005, **PLAIN}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["steps"] == 20
    assert len(answer["scores"]) == 20
    moved = (tensor_of(answer) - 128 / 255).reshape(-1).astype(np.float64)
    w = weight_row().astype(np.float64)
    assert moved @ w / (np.linalg.norm(moved) * np.linalg.norm(w)) > 0.99
    scores = [*answer["scores"], answer["score"]]
    assert all(b > a for a, b in itertools.pairwise(scores))
    assert answer["label"] == "w"
    png = cv2.imdecode(np.frombuffer(base64.b64decode(answer["image"]), np.uint8), -1)
    assert png is not None
    assert png.shape == (SIZE, SIZE, 3)


def test_clipping_keeps_values_in_the_pixel_range(linear_client: TestClient) -> None:
    response = linear_client.post(
        URL, json={"target": "w", "steps": 10, "learning_rate": 1.0, "array": True}
    )
    assert response.status_code == 200, response.text
    values = tensor_of(response.json())
    assert values.min() >= 0.0
    assert values.max() <= 1.0
    assert values.min() == 0.0
    assert values.max() == 1.0


def stream_events(client: TestClient, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.iter_lines() if line]


def test_streaming_yields_steps_then_the_result(linear_client: TestClient) -> None:
    events = stream_events(linear_client, URL, {"target": 0, "steps": 6})
    assert [e["step"] for e in events[:-1]] == list(range(6))
    result = events[-1]["result"]
    assert result["scores"] == [e["score"] for e in events[:-1]]
    assert result["target"] == 0
    assert result["steps"] == 6


def test_bad_requests_are_422(linear_client: TestClient) -> None:
    assert linear_client.post(URL, json={"target": 0, "steps": 501}).status_code == 422
    assert linear_client.post(URL, json={"target": "nope"}).status_code == 422
    assert linear_client.post(URL, json={"target": 7}).status_code == 422
    assert linear_client.post("/v1/models/absent/maximize", json={"target": 0}).status_code == 404


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(height=8, width=9),
        InputSpec(
            height=8,
            width=9,
            layout="NHWC",
            color="BGR",
            scale=1.0,
            mean=(10.0, 20.0, 30.0),
            std=(2.0, 3.0, 4.0),
        ),
    ],
)
def test_pixels_round_trip_and_range(spec: InputSpec) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(8, 9, 3)).astype(np.uint8)
    tensor = to_tensor(pixels, spec)
    np.testing.assert_array_equal(to_pixels(tensor, spec), pixels)
    low, high = valid_range(spec)
    assert np.all(tensor >= low - 1e-5)
    assert np.all(tensor <= high + 1e-5)
    np.testing.assert_allclose(to_tensor(np.zeros((8, 9, 3)), spec).min(), low.min(), atol=1e-5)


def test_pixels_at_the_input_size_are_never_cropped_again() -> None:
    """A centre-crop model's input is already cropped: to_tensor must not crop it once more."""
    spec = InputSpec(height=8, width=8, resize="center_crop", crop_fraction=0.5)
    pixels = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    np.testing.assert_array_equal(to_pixels(to_tensor(pixels, spec), spec), pixels)


EFFICIENTNET = "/v1/models/efficientnet-lite0/maximize"


def test_efficientnet_five_steps_raise_the_target(client: TestClient) -> None:
    response = client.post(EFFICIENTNET, json={"target": 285, "steps": 5})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["score"] > answer["scores"][0]


def test_the_deadline_stops_a_long_run(client: TestClient) -> None:
    body = {"target": 285, "steps": 500, "timeout_ms": 400}
    response = client.post(EFFICIENTNET, json=body)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    events = stream_events(client, EFFICIENTNET, body)
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    assert "result" not in events[-1]


def test_a_layer_channel_can_be_maximized(tmp_path: Path) -> None:
    """Channel 0 of the tiny CNN's ReLU layer is ReLU(red); its mean rises as red grows."""
    write_model_folder(tmp_path / "cnn", scale=1 / 255, std=(0.5, 0.5, 0.5))
    with make_client(tmp_path) as cnn_client:
        response = cnn_client.post(
            "/v1/models/cnn/maximize",
            json={
                "target": 0,
                "layer": "relu",
                "steps": 10,
                "jitter": 0,
                "blur_every": 0,
                "l2_decay": 0.0,
                "clip": False,
                "array": True,
            },
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["label"] == "relu[0]"
        assert all(b > a for a, b in itertools.pairwise(answer["scores"]))
        final = tensor_of(answer)
        # Only the red channel feeds channel 0: green and blue never move from grey.
        assert final[0, 0].mean() > final[0, 1].mean()
        np.testing.assert_allclose(final[0, 1], final[0, 2], atol=1e-6)
        bad = cnn_client.post(
            "/v1/models/cnn/maximize", json={"target": 9, "layer": "relu", "steps": 1}
        )
        assert bad.status_code == 422
        unknown = cnn_client.post(
            "/v1/models/cnn/maximize", json={"target": 0, "layer": "nope", "steps": 1}
        )
        assert unknown.status_code == 422
