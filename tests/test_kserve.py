"""KServe's V1 protocol: `:predict` and `:explain` over `instances`, through real HTTP."""

import base64

import numpy as np
from fastapi.testclient import TestClient

from engines.imaging.decode import ImageLimits, decode_image, preprocess
from schemas.model_config import InputSpec
from tests.images import encode, solid
from tests.test_api import assert_error, assert_still_serving

RED = encode(solid((220, 10, 10), 20, 30))
BLUE = encode(solid((10, 10, 220), 40, 24))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensor_instance(client: TestClient, data: bytes) -> list[object]:
    """The model's own input for an image, as a nested list (no batch axis)."""
    spec = client.get("/v1/models/tiny").json()["input"]
    tensor = preprocess([decode_image(data, ImageLimits())], InputSpec.model_validate(spec))
    nested: list[object] = tensor[0].tolist()
    return nested


def test_v1_metadata_answers_name_and_ready(tiny_client: TestClient) -> None:
    info = tiny_client.get("/v1/models/tiny").json()
    assert (info["name"], info["ready"]) == ("tiny", True)


def test_predict_answers_one_prediction_per_instance_in_each_encoding(
    tiny_client: TestClient,
) -> None:
    instances = [
        {"image": {"b64": b64(RED)}},
        {"b64": b64(BLUE)},
        tensor_instance(tiny_client, RED),
    ]
    response = tiny_client.post("/v1/models/tiny:predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p[0]["label"] for p in predictions] == ["red", "blue", "red"]
    assert predictions[0] == predictions[2]  # the tensor is what the image becomes
    assert len(predictions[0]) == 3  # top_k 5, the tiny model has three classes


def test_explain_answers_maps_per_instance(tiny_client: TestClient) -> None:
    body = {
        "instances": [{"image": {"b64": b64(RED)}}, tensor_instance(tiny_client, RED)],
        "method": "gradcam",
        "targets": ["red"],
        "output": {"format": "array", "normalize": "none"},
    }
    response = tiny_client.post("/v1/models/tiny:explain", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [p[0]["label"] for p in answer["predictions"]] == ["red", "red"]
    from_image, from_tensor = (e[0]["heatmap"] for e in answer["explanations"])
    assert from_image["shape"] == [20, 30]  # the upload's size
    assert from_tensor["shape"] == [16, 16]  # the model's: a tensor has no other
    maps = [
        np.frombuffer(base64.b64decode(h["data"]), "<f4").reshape(h["shape"])
        for h in (from_image, from_tensor)
    ]
    assert all(float(m.max()) > 0 for m in maps)


def test_bad_instances_get_clear_errors_and_the_service_keeps_serving(
    tiny_client: TestClient,
) -> None:
    cases = [
        ({"instances": []}, 422, "invalid_request"),
        ({"instances": [{"b64": b64(RED)}] * 17}, 422, "invalid_request"),
        ({"instances": [[[0.0] * 16] * 16]}, 422, "invalid_parameters"),  # not (3, 16, 16)
        ({"instances": [{"b64": "not base64!"}]}, 422, "invalid_image"),
        ({"instances": [{"b64": b64(b"not an image")}]}, 415, "unsupported_image"),
        ({"instances": [{"image": {"url": "http://example.com/x.png"}}]}, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        assert_error(tiny_client.post("/v1/models/tiny:predict", json=body), status, code)
    overlay = {
        "instances": [tensor_instance(tiny_client, RED)],
        "output": {"format": "overlay"},
    }
    assert_error(tiny_client.post("/v1/models/tiny:explain", json=overlay), 422, "invalid_request")
    missing = tiny_client.post("/v1/models/nope:predict", json={"instances": [{"b64": b64(RED)}]})
    assert_error(missing, 404, "model_not_found")
    assert_still_serving(tiny_client)
