"""The real EfficientNet-Lite0, built by our converter, over real HTTP."""

import base64

from fastapi.testclient import TestClient

from tests.images import encode, photo

MODEL = "efficientnet-lite0"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = {967, 968}  # espresso, cup


def predict(client: TestClient, image: bytes, top_k: int = 5) -> list[dict[str, object]]:
    response = client.post(
        f"/v1/models/{MODEL}/predict",
        json={"image": base64.b64encode(image).decode(), "top_k": top_k},
    )
    assert response.status_code == 200, response.text
    predictions: list[dict[str, object]] = response.json()["predictions"]
    return predictions


def test_chelsea_is_a_cat(client: TestClient) -> None:
    top = predict(client, encode(photo("chelsea"), ".png"))
    assert top[0]["index"] in CAT_CLASSES, top
    assert "cat" in str(top[0]["label"]).lower() or top[0]["index"] in CAT_CLASSES


def test_coffee_has_a_cup_or_espresso_in_its_top_five(client: TestClient) -> None:
    top = predict(client, encode(photo("coffee"), ".jpg"))
    assert CUP_CLASSES & {p["index"] for p in top}, top


def test_multipart_jpeg_upload_of_the_cat(client: TestClient) -> None:
    response = client.post(
        f"/v1/models/{MODEL}/predict",
        files={"image": ("chelsea.jpg", encode(photo("chelsea"), ".jpg"), "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["index"] in CAT_CLASSES


def test_grayscale_and_webp_photos_are_accepted(client: TestClient) -> None:
    import cv2

    gray = cv2.cvtColor(photo("chelsea"), cv2.COLOR_RGB2GRAY)
    ok, gray_png = cv2.imencode(".png", gray)
    assert ok
    assert len(predict(client, bytes(gray_png), top_k=3)) == 3
    top = predict(client, encode(photo("chelsea"), ".webp"))
    assert top[0]["index"] in CAT_CLASSES


def test_model_details_name_the_grad_cam_layer(client: TestClient) -> None:
    info = client.get(f"/v1/models/{MODEL}").json()
    assert info["ready"] is True
    assert info["labels_count"] == 1000
    assert info["input"]["height"] == 224
    assert info["input"]["width"] == 224
    layers = {layer["name"]: layer for layer in info["layers"]}
    default = layers[info["default_layer"]]
    assert default["shape"][1:] == [1280, 7, 7]
