"""One-channel (grayscale) models: an RGB image becomes luminance as PIL's convert("L") makes
it, and every method serves the one-channel input."""

import base64
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from engines.imaging.decode import luminance, preprocess, to_pixels
from schemas.model_config import InputSpec
from tests.conftest import make_client
from tests.tiny_models import write_model_folder

SIZE = 16
ARRAY = {"format": "array", "normalize": "none", "size": "model"}


@pytest.fixture(scope="module")
def gray_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("gray")
    write_model_folder(
        root / "gray",
        "gray_brightness",
        color="GRAY",
        scale=1 / 255,
        mean=(0.5,),
        std=(0.5,),
        size=SIZE,
        labels=("bright", "dark"),
    )
    with make_client(root) as client:
        yield client


def _png(rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return base64.b64encode(png.tobytes()).decode()


def _array(explanation: dict) -> np.ndarray:  # type: ignore[type-arg]
    heatmap = explanation["heatmap"]
    values = np.frombuffer(base64.b64decode(heatmap["data"]), dtype="<f4")
    return values.reshape(heatmap["shape"])


def test_luminance_is_pils_gray_conversion_bit_for_bit() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(luminance(rgb), expected)


def test_a_gray_spec_takes_one_mean_and_round_trips_pixels() -> None:
    spec = InputSpec(height=8, width=8, color="GRAY", scale=1 / 255, mean=(0.5,), std=(0.25,))
    assert spec.image_dims == (1, 8, 8)
    assert InputSpec(height=8, width=8, color="GRAY").mean == (0.0,)  # the default, once
    with pytest.raises(ValidationError, match="mean needs 1 value"):
        InputSpec(height=8, width=8, color="GRAY", mean=(0.4, 0.5, 0.6))
    with pytest.raises(ValidationError, match="std needs 3 value"):
        InputSpec(height=8, width=8, std=(0.5,))
    gray = np.full((8, 8, 3), 200, np.uint8)
    tensor = preprocess([gray], spec)
    assert tensor.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(tensor, (200 / 255 - 0.5) / 0.25, rtol=1e-6)
    np.testing.assert_array_equal(to_pixels(tensor, spec), gray)


def test_a_gray_model_serves_predictions_and_explanations(gray_client: TestClient) -> None:
    info = gray_client.get("/v1/models/gray").json()
    assert info["ready"]
    assert info["input"]["color"] == "GRAY"
    # pure green is gray 150 (PIL's weights): (150/255 - 0.5) / 0.5 > 0, a "bright" image
    green = np.zeros((SIZE, SIZE, 3), np.uint8)
    green[..., 1] = 255
    black = np.zeros_like(green)
    for image, label in ((green, "bright"), (black, "dark")):
        response = gray_client.post("/v1/models/gray/predict", json={"image": _png(image)})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == label

    # logit 0 = mean(ReLU(x)): d/dx = 1/256 at every pixel, for x = 2 * 150/255 - 1 > 0
    body = {"image": _png(green), "targets": [0], "output": ARRAY}
    saliency = gray_client.post("/v1/models/gray/explain", json={**body, "method": "saliency"})
    assert saliency.status_code == 200, saliency.text
    np.testing.assert_allclose(_array(saliency.json()["explanations"][0]), 1 / SIZE**2, rtol=1e-6)

    # occluding a 4x4 patch with black (x = -1, ReLU 0) removes its share of the mean
    occlusion = gray_client.post(
        "/v1/models/gray/explain",
        json={
            **body,
            "method": "occlusion",
            "params": {"window": 4, "stride": 4, "value": 0, "score": "logit"},
        },
    )
    assert occlusion.status_code == 200, occlusion.text
    x = 2 * 150 / 255 - 1
    drop = _array(occlusion.json()["explanations"][0])
    np.testing.assert_allclose(drop, x * 16 / SIZE**2, rtol=1e-4)

    for method in ("gradcam", "guided_backprop", "integrated_gradients", "smoothgrad", "rise"):
        response = gray_client.post("/v1/models/gray/explain", json={**body, "method": method})
        assert response.status_code == 200, f"{method}: {response.text}"


def test_a_gray_model_serves_the_insight_views(gray_client: TestClient) -> None:
    filters = gray_client.get("/v1/models/gray/filters", params={"format": "array"})
    assert filters.status_code == 200, filters.text
    assert filters.json()["kernel_shape"] == [2, 1, 1, 1]
    white = np.full((SIZE, SIZE, 3), 255, np.uint8)
    activations = gray_client.post(
        "/v1/models/gray/activations", json={"image": _png(white), "layers": ["relu"]}
    )
    assert activations.status_code == 200, activations.text
    maximized = gray_client.post(
        "/v1/models/gray/maximize", json={"target": 0, "steps": 5, "array": True}
    )
    assert maximized.status_code == 200, maximized.text
