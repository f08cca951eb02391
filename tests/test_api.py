"""Real HTTP through the app against tiny models: routes, errors and limits."""

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_client
from tests.images import encode, solid

GOOD_PNG = encode(solid((10, 200, 30)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: object, status: int, code: str) -> None:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]


def assert_still_serving(client: TestClient) -> None:
    response = client.post("/v1/models/tiny/predict", json={"image": b64(GOOD_PNG), "top_k": 1})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "green"


def test_health_and_readiness(tiny_client: TestClient) -> None:
    assert tiny_client.get("/healthz").json() == {"status": "ok"}
    ready = tiny_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "models": {"broken": "failed", "tiny": "loaded"}}


def test_readyz_is_503_until_models_are_loaded(tiny_repository_dir: Path) -> None:
    from engines.models.repository import ModelRepository
    from service.app import create_app
    from service.settings import Settings
    from tests.conftest import CPU

    repository = ModelRepository(tiny_repository_dir, CPU)
    client = TestClient(create_app(Settings(model_repository=tiny_repository_dir), repository))
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert_error(
        client.post("/v1/models/tiny/predict", json={"image": b64(GOOD_PNG)}),
        503,
        "model_not_ready",
    )
    repository.load_all()
    assert client.get("/readyz").status_code == 200


def test_model_listing_and_details(tiny_client: TestClient) -> None:
    listing = tiny_client.get("/v1/models").json()["models"]
    assert [(m["name"], m["ready"]) for m in listing] == [("broken", False), ("tiny", True)]
    broken = listing[0]
    assert broken["state"] == "failed"
    assert "ONNX" in broken["reason"]

    info = tiny_client.get("/v1/models/tiny").json()
    assert info["provider"] == "CPUExecutionProvider"
    assert info["labels_count"] == 3
    assert info["input"]["height"] == 16
    assert info["input"]["layout"] == "NCHW"
    assert [layer["name"] for layer in info["layers"]] == ["conv", "relu"]
    assert info["default_layer"] == "relu"
    assert len(info["sha256"]) == 64

    broken_info = tiny_client.get("/v1/models/broken").json()
    assert broken_info["ready"] is False
    assert broken_info["provider"] is None


def test_predict_json_and_multipart_agree(tiny_client: TestClient) -> None:
    by_json = tiny_client.post("/v1/models/tiny/predict", json={"image": b64(GOOD_PNG), "top_k": 3})
    assert by_json.status_code == 200, by_json.text
    body = by_json.json()
    assert body["model"] == "tiny"
    assert [p["index"] for p in body["predictions"]] == sorted(
        [p["index"] for p in body["predictions"]],
        key=lambda i: -next(p["score"] for p in body["predictions"] if p["index"] == i),
    )
    assert sum(p["score"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert set(body["timings_ms"]) == {"decode", "inference", "total"}

    by_upload = tiny_client.post(
        "/v1/models/tiny/predict",
        files={"image": ("green.png", GOOD_PNG, "image/png")},
        data={"top_k": "3"},
    )
    assert by_upload.status_code == 200, by_upload.text
    assert by_upload.json()["predictions"] == body["predictions"]


def test_data_url_and_wrapped_base64_are_accepted(tiny_client: TestClient) -> None:
    encoded = b64(GOOD_PNG)
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    for image in (f"data:image/png;base64,{encoded}", wrapped):
        response = tiny_client.post("/v1/models/tiny/predict", json={"image": image})
        assert response.status_code == 200, response.text


BAD_REQUESTS = [
    (
        "empty body",
        {"content": b"", "headers": {"content-type": "application/json"}},
        422,
        "invalid_request",
    ),
    (
        "not json",
        {"content": b"{nope", "headers": {"content-type": "application/json"}},
        422,
        "invalid_request",
    ),
    ("image is a number", {"json": {"image": 5}}, 422, "invalid_request"),
    (
        "top_k is a string",
        {"json": {"image": b64(GOOD_PNG), "top_k": "many"}},
        422,
        "invalid_request",
    ),
    ("top_k out of range", {"json": {"image": b64(GOOD_PNG), "top_k": 0}}, 422, "invalid_request"),
    ("unknown field", {"json": {"image": b64(GOOD_PNG), "colour": "red"}}, 422, "invalid_request"),
    ("json array", {"json": [1, 2]}, 422, "invalid_request"),
    ("bad base64", {"json": {"image": "%%%not-base64%%%"}}, 422, "invalid_request"),
    ("empty image", {"json": {"image": ""}}, 422, "invalid_request"),
    (
        "text named .png",
        {"files": {"image": ("cat.png", b"just some text, honestly", "image/png")}},
        415,
        "unsupported_image",
    ),
    (
        "truncated jpeg",
        {"json": {"image": b64(encode(solid((9, 9, 9), 64, 64), ".jpg")[:300])}},
        422,
        "invalid_image",
    ),
    ("1x1 image", {"json": {"image": b64(encode(solid((1, 2, 3), 1, 1)))}}, 422, "image_too_small"),
    (
        "multipart without image",
        {"files": {"picture": ("a.png", GOOD_PNG, "image/png")}},
        422,
        "invalid_request",
    ),
    (
        "multipart bad top_k",
        {"files": {"image": ("a.png", GOOD_PNG, "image/png")}, "data": {"top_k": "x"}},
        422,
        "invalid_request",
    ),
    ("form urlencoded", {"data": {"image": "abc"}}, 415, "unsupported_media_type"),
]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_a_clear_error_and_the_service_keeps_serving(
    tiny_client: TestClient, kwargs: dict[str, object], status: int, code: str
) -> None:
    response = tiny_client.post("/v1/models/tiny/predict", **kwargs)  # type: ignore[arg-type]
    assert_error(response, status, code)
    assert_still_serving(tiny_client)


def test_unknown_model_is_404_and_broken_model_is_503(tiny_client: TestClient) -> None:
    assert_error(tiny_client.get("/v1/models/resnet"), 404, "model_not_found")
    assert_error(
        tiny_client.post("/v1/models/resnet/predict", json={"image": b64(GOOD_PNG)}),
        404,
        "model_not_found",
    )
    assert_error(tiny_client.get("/v1/models/" + "x" * 65), 422, "invalid_request")
    response = tiny_client.post("/v1/models/broken/predict", json={"image": b64(GOOD_PNG)})
    assert_error(response, 503, "model_not_ready")
    assert "failed to load" in response.json()["error"]["message"]
    traversal = tiny_client.get("/v1/models/..%2Ftiny")
    assert traversal.status_code == 404
    assert traversal.json()["error"]["code"] in {"model_not_found", "not_found"}
    assert_still_serving(tiny_client)


def test_unknown_route_and_wrong_method_use_the_error_envelope(tiny_client: TestClient) -> None:
    assert_error(tiny_client.get("/v2/nothing"), 404, "not_found")
    assert_error(tiny_client.get("/v1/models/tiny/predict"), 405, "method_not_allowed")


def test_image_over_the_pixel_limit(tiny_repository_dir: Path) -> None:
    with make_client(tiny_repository_dir, max_image_pixels=1000) as client:
        big = encode(solid((5, 5, 5), 100, 100))
        assert_error(
            client.post("/v1/models/tiny/predict", json={"image": b64(big)}), 413, "image_too_large"
        )
        small = encode(solid((5, 5, 5), 20, 20))
        assert client.post("/v1/models/tiny/predict", json={"image": b64(small)}).status_code == 200


def test_body_too_large_by_header_and_by_stream(tiny_repository_dir: Path) -> None:
    with make_client(tiny_repository_dir, max_body_bytes=2048) as client:
        payload = {"image": b64(encode(solid((1, 1, 1), 8, 8)) + b"\x00" * 4096)}
        assert_error(client.post("/v1/models/tiny/predict", json=payload), 413, "body_too_large")

        def chunks() -> object:
            for _ in range(8):
                yield b"x" * 1024

        streamed = client.post(
            "/v1/models/tiny/predict",
            content=chunks(),  # type: ignore[arg-type]
            headers={"content-type": "application/json"},
        )
        assert_error(streamed, 413, "body_too_large")
        assert (
            client.post("/v1/models/tiny/predict", json={"image": b64(GOOD_PNG)}).status_code == 200
        )


def test_openapi_documents_both_request_bodies(tiny_client: TestClient) -> None:
    spec = tiny_client.get("/openapi.json").json()
    content = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert "example" in content["application/json"]
    assert tiny_client.get("/docs").status_code == 200


def test_every_image_route_documents_its_fields_in_both_encodings(tiny_client: TestClient) -> None:
    """Read off the request schemas: no dangling `$defs` references, and the multipart form
    has the JSON body's fields, the image as a file."""
    spec = tiny_client.get("/openapi.json").json()
    routes = [
        "/v1/models/{name}/predict",
        "/v1/models/{name}/explain",
        "/v1/models/{name}/activations",
        "/v1/models/{name}/maximize",
    ]
    for route in routes:
        content = spec["paths"][route]["post"]["requestBody"]["content"]
        body = content["application/json"]["schema"]
        assert "#/$defs/" not in json.dumps(content), route
        form = content.get("multipart/form-data")
        if form is None:
            assert route.endswith("maximize")  # JSON only: it takes no image
            continue
        fields = form["schema"]["properties"]
        assert set(fields) == set(body["properties"]), route
        assert fields["image"] == {"type": "string", "format": "binary"}
        assert set(form["schema"]["required"]) == set(body.get("required", []))
