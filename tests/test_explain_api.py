"""POST /v1/models/{name}/explain over real HTTP against the tiny CNN."""

import base64
import json
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.imaging.decode import ImageLimits, decode_image, fit_to_input
from schemas.model_config import InputSpec
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
    output = {"format": "array", "normalize": "none"}
    response = tiny_client.post(URL, json=body(method=method, output=output))
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
        ({"output": {"format": ["png", "png"]}}, "invalid_request"),
        ({"output": {"size": [0, 16]}}, "invalid_request"),
        ({"output": {"normalize": "percentile", "percentile": 0}}, "invalid_request"),
        ({"output": {"format": "overlay", "alpha": 2}}, "invalid_request"),
        ({"output": {"format": "array", "dtype": "float64"}}, "invalid_request"),
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


def decode_png(heatmap: dict[str, Any]) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(str(heatmap["data"])), np.uint8)
    pixels = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    assert pixels is not None
    return pixels


def explain_maps(client: TestClient, **output: object) -> list[dict[str, Any]]:
    response = client.post(URL, json=body(output=output))
    assert response.status_code == 200, response.text
    (explanation,) = response.json()["explanations"]
    assert explanation["heatmap"] == explanation["heatmaps"][0]
    heatmaps: list[dict[str, Any]] = explanation["heatmaps"]
    return heatmaps


def test_every_format_in_one_response_decodes_to_the_engine_map(tiny_client: TestClient) -> None:
    (raw,) = explain_maps(tiny_client, format="array", normalize="none", size="model")
    engine = decode_array(raw)
    assert engine.shape == (16, 16)
    unit = (engine - engine.min()) / (engine.max() - engine.min())
    formats = ["json", "png16", "array", "png", "colormap", "overlay"]
    heatmaps = explain_maps(tiny_client, format=formats, size="model", colormap="inferno")
    assert [h["format"] for h in heatmaps] == formats
    json_map, png16, array, png, colormap, overlay = heatmaps
    assert json_map["normalize"] == "minmax"
    assert json_map["source_range"] == pytest.approx([engine.min(), engine.max()])
    np.testing.assert_allclose(np.array(json_map["values"], np.float32), unit, atol=1e-6)
    np.testing.assert_allclose(decode_png(png16) / 65535, unit, atol=0.5 / 65535 + 1e-6)
    np.testing.assert_array_equal(decode_array(array), np.array(json_map["values"], np.float32))
    gray8 = decode_png(png)
    np.testing.assert_allclose(gray8 / 255, unit, atol=0.5 / 255 + 1e-6)
    colored = cv2.applyColorMap(gray8, cv2.COLORMAP_INFERNO)
    np.testing.assert_array_equal(decode_png(colormap), colored)
    # At the model's size the overlay is drawn on the image as the model saw it.
    seen = fit_to_input(
        decode_image(red_square_png(), ImageLimits()), InputSpec(height=16, width=16)
    )
    blended = cv2.addWeighted(colored, 0.5, cv2.cvtColor(seen, cv2.COLOR_RGB2BGR), 0.5, 0.0)
    np.testing.assert_array_equal(decode_png(overlay), blended)


def test_overlay_at_input_size_is_drawn_on_the_upload(tiny_client: TestClient) -> None:
    png, overlay = explain_maps(tiny_client, format=["png", "overlay"], alpha=0.25)
    image_bgr = cv2.imdecode(np.frombuffer(red_square_png(), np.uint8), cv2.IMREAD_COLOR)
    assert image_bgr is not None
    colored = cv2.applyColorMap(decode_png(png), cv2.COLORMAP_JET)
    expected = cv2.addWeighted(colored, 0.25, image_bgr, 0.75, 0.0)
    np.testing.assert_array_equal(decode_png(overlay), expected)
    assert (overlay["alpha"], overlay["colormap"]) == (0.25, "jet")


@pytest.mark.parametrize(
    ("size", "shape"), [("model", (16, 16)), ("input", (32, 32)), ([20, 48], (20, 48))]
)
def test_size_sets_the_shape_of_every_format(
    tiny_client: TestClient, size: object, shape: tuple[int, int]
) -> None:
    heatmaps = explain_maps(
        tiny_client, format=["png", "png16", "colormap", "overlay", "array", "json"], size=size
    )
    png, png16, colormap, overlay, array, json_map = heatmaps
    assert decode_png(png).shape == decode_png(png16).shape == shape
    assert decode_png(colormap).shape == decode_png(overlay).shape == (*shape, 3)
    assert tuple(array["shape"]) == tuple(json_map["shape"]) == shape
    assert decode_array(array).shape == np.array(json_map["values"]).shape == shape


def test_signed_and_percentile_over_http(tiny_client: TestClient) -> None:
    (raw,) = explain_maps(tiny_client, format="array", normalize="none", size="model")
    engine = decode_array(raw)
    (signed,) = explain_maps(tiny_client, format="json", normalize="signed", size="model")
    bound = np.abs(engine).max()
    np.testing.assert_allclose(signed["values"], (engine / bound + 1) / 2, atol=1e-6)
    assert signed["source_range"] == pytest.approx([-bound, bound])
    (clipped,) = explain_maps(
        tiny_client, format="array", normalize="percentile", percentile=80, size="model"
    )
    top = engine > np.percentile(engine, 80)
    assert top.any()
    assert decode_array(clipped)[top].min() == 1.0
    (half,) = explain_maps(tiny_client, format="array", dtype="float16", size="model")
    assert half["dtype"] == "float16"
    halves = np.frombuffer(base64.b64decode(half["data"]), "<f2").reshape(16, 16)
    unit = (engine - engine.min()) / (engine.max() - engine.min())
    np.testing.assert_allclose(halves, unit, rtol=2**-11, atol=2**-24)


def test_raw_values_cannot_be_a_png(tiny_client: TestClient) -> None:
    output = {"format": ["array", "png"], "normalize": "none"}
    response = tiny_client.post(URL, json=body(output=output))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "none" in error["message"]
    assert "png" in error["message"]


def test_json_over_the_limit_is_refused_naming_the_limit(tiny_client: TestClient) -> None:
    response = tiny_client.post(URL, json=body(output={"format": "json", "size": [300, 300]}))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "65536" in error["message"]
    assert "300x300" in error["message"]


def test_multipart_output_with_several_formats(tiny_client: TestClient) -> None:
    response = tiny_client.post(
        URL,
        files={"image": ("sq.png", red_square_png(), "image/png")},
        data={"method": "gradcam", "output": json.dumps({"format": ["array", "png"]})},
    )
    assert response.status_code == 200, response.text
    (explanation,) = response.json()["explanations"]
    assert [h["format"] for h in explanation["heatmaps"]] == ["array", "png"]
    assert explanation["heatmap"]["format"] == "array"
