"""Insight views: layer summary, Conv filters, feature maps."""

import base64
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper

from engines.imaging.decode import preprocess
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions
from service.cli import main
from tests.images import encode, solid

CPU = RuntimeOptions(providers="cpu", intra_op_threads=1)


def _png(data: str, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), flags)
    assert pixels is not None
    return pixels


def _floats(payload: dict[str, object]) -> np.ndarray:
    data = base64.b64decode(str(payload["data"]))
    shape = payload["shape"]
    assert isinstance(shape, list)
    return np.frombuffer(data, dtype="<f4").reshape(shape)


def _initializer_total(path: Path) -> int:
    return sum(math.prod(i.dims) for i in onnx.load(str(path)).graph.initializer)


def _actual_shapes(model: LoadedModel, outputs: list[str]) -> dict[str, tuple[int, ...]]:
    graph = onnx.load(str(model.model_path))
    existing = {o.name for o in graph.graph.output}
    for name in outputs:
        if name not in existing:
            graph.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = preprocess([solid((120, 60, 30), 64, 64)], model.config.input)
    values = session.run(outputs, {model.input_name: batch})
    return {name: tuple(v.shape) for name, v in zip(outputs, values, strict=True)}


@pytest.mark.parametrize(
    ("fixture", "model", "sample"),
    [("tiny_client", "tiny", None), ("client", "efficientnet-lite0", 10)],
)
def test_summary_params_and_shapes_match_the_model(
    request: pytest.FixtureRequest,
    fixture: str,
    model: str,
    sample: int | None,
    tiny_repository_dir: Path,
    default_model_dir: Path,
) -> None:
    client: TestClient = request.getfixturevalue(fixture)
    root = tiny_repository_dir if model == "tiny" else default_model_dir
    response = client.get(f"/v1/models/{model}/summary")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total_params"] == _initializer_total(root / model / "model.onnx")
    nodes = len(onnx.load(str(root / model / "model.onnx")).graph.node)
    assert body["nodes"] == len(body["rows"]) == nodes
    assert sum(row["params"] for row in body["rows"]) == body["total_params"]
    rows = body["rows"]
    if sample is not None:
        rows = rows[:: max(1, len(rows) // sample)][:sample]
    loaded = LoadedModel(model, root / model, CPU)
    actual = _actual_shapes(loaded, [row["output"] for row in rows])
    for row in rows:
        assert tuple(row["output_shape"]) == actual[row["output"]], row


def test_summary_tiny_rows(tiny_client: TestClient) -> None:
    body = tiny_client.get("/v1/models/tiny/summary").json()
    assert [(r["name"], r["op_type"], r["params"]) for r in body["rows"]] == [
        ("conv", "Conv", 4 * 3 * 3 * 3 + 4),
        ("relu", "Relu", 0),
        ("pool", "GlobalAveragePool", 0),
        ("flat", "Flatten", 0),
        ("logits", "Gemm", 3 * 4 + 3),
    ]
    assert body["input_shape"] == [1, 3, 16, 16]


def test_summary_as_text(tiny_client: TestClient) -> None:
    response = tiny_client.get(
        "/v1/models/tiny/summary", headers={"Accept": "text/plain, application/json;q=0.5"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "Total params: 127" in response.text
    assert "conv (Conv)" in response.text
    assert "(1, 4, 16, 16)" in response.text
    default = tiny_client.get("/v1/models/tiny/summary", headers={"Accept": "*/*"})
    assert default.headers["content-type"].startswith("application/json")


def test_summary_unknown_model(tiny_client: TestClient) -> None:
    response = tiny_client.get("/v1/models/nope/summary")
    assert response.status_code == 404
    assert response.json()["error"]["code"]


def test_cli_prints_the_table(
    tiny_repository_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["summary", "tiny", "--repository", str(tiny_repository_dir)]) == 0
    out = capsys.readouterr().out
    assert "Total params: 127" in out
    assert "Nodes: 5" in out
    assert "logits (Gemm)" in out
    assert main(["summary", "nope", "--repository", str(tiny_repository_dir)]) == 2


def _tiny_conv(tiny_repository_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    inits = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(tiny_repository_dir / "tiny" / "model.onnx")).graph.initializer
    }
    return inits["conv_w"], inits["conv_b"]


def test_filters_arrays_equal_the_initializer(
    tiny_client: TestClient, tiny_repository_dir: Path
) -> None:
    weights, bias = _tiny_conv(tiny_repository_dir)
    response = tiny_client.get("/v1/models/tiny/filters?format=array&format=png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["layer"], body["output"], body["total"], body["count"]) == ("conv", "conv", 4, 4)
    assert np.array_equal(_floats(body["weights"]), weights)
    assert np.array_equal(_floats(body["bias"]), bias)
    # 3 input channels: one RGB tile per filter, 3x3 kernels enlarged to 33x33.
    grid = body["grid"]
    assert (grid["color"], grid["tiles"], grid["rows"], grid["cols"]) == ("rgb", 4, 2, 2)
    th, tw = grid["tile"]
    assert th == tw
    assert th >= 32
    assert _png(grid["data"]).shape == (2 * th + 1, 2 * tw + 1, 3)


def test_filters_pagination(tiny_client: TestClient, tiny_repository_dir: Path) -> None:
    weights, _ = _tiny_conv(tiny_repository_dir)
    body = tiny_client.get("/v1/models/tiny/filters?layer=conv&offset=1&limit=2&format=array")
    body = body.json()
    assert (body["total"], body["offset"], body["limit"], body["count"]) == (4, 1, 2, 2)
    assert body["grid"] is None
    assert np.array_equal(_floats(body["weights"]), weights[1:3])
    last = tiny_client.get("/v1/models/tiny/filters?offset=3&limit=256&format=array").json()
    assert last["count"] == 1
    assert np.array_equal(_floats(last["weights"]), weights[3:])
    only_png = tiny_client.get("/v1/models/tiny/filters?offset=3").json()
    assert only_png["weights"] is None
    assert only_png["grid"]["tiles"] == 1


@pytest.mark.parametrize(
    "query",
    ["layer=relu", "layer=nope", "offset=4", "limit=257", "limit=0", "format=jpeg"],
)
def test_filters_errors(tiny_client: TestClient, query: str) -> None:
    response = tiny_client.get(f"/v1/models/tiny/filters?{query}")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"]


def test_filters_efficientnet_stem_is_rgb(client: TestClient) -> None:
    body = client.get("/v1/models/efficientnet-lite0/filters").json()
    assert body["layer"] == "stem/conv"
    assert body["kernel_shape"] == [32, 3, 3, 3]
    assert (body["total"], body["count"]) == (32, 32)
    grid = body["grid"]
    assert grid["color"] == "rgb"
    assert grid["tiles"] == 32
    th, tw = grid["tile"]
    image = _png(grid["data"])
    assert image.shape == (grid["rows"] * (th + 1) - 1, grid["cols"] * (tw + 1) - 1, 3)


def test_filters_grayscale_grid(client: TestClient) -> None:
    # A pointwise conv: one gray tile per (filter, input channel), capped at 1024 tiles.
    summary = client.get("/v1/models/efficientnet-lite0/summary").json()
    convs = [r for r in summary["rows"] if r["op_type"] == "Conv"]
    body = client.get(
        "/v1/models/efficientnet-lite0/filters", params={"layer": convs[2]["output"], "limit": 8}
    ).json()
    inputs = body["kernel_shape"][1]
    grid = body["grid"]
    assert grid["color"] == "gray"
    assert body["channels_shown"] == min(inputs, 1024 // 8)
    assert (grid["rows"], grid["cols"]) == (8, body["channels_shown"])
    assert _png(grid["data"]).ndim == 2


def _activations(client: TestClient, model: str, **fields: object) -> tuple[int, dict[str, object]]:
    payload = {"image": base64.b64encode(encode(solid((200, 40, 90), 40, 48))).decode(), **fields}
    response = client.post(f"/v1/models/{model}/activations", json=payload)
    return response.status_code, response.json()


def test_activation_arrays_equal_onnxruntime(
    tiny_client: TestClient, tiny_repository_dir: Path
) -> None:
    status, body = _activations(
        tiny_client, "tiny", layers=["conv", "relu"], channels=[3, 0], format="array"
    )
    assert status == 200, body
    model = LoadedModel("tiny", tiny_repository_dir / "tiny", CPU)
    batch = preprocess([solid((200, 40, 90), 40, 48)], model.config.input)
    layers = body["layers"]
    assert isinstance(layers, list)
    for entry in layers:
        expected = model.layer_activations(batch, entry["layer"])[0]
        assert entry["shape"] == [1, 4, 16, 16]
        assert entry["channels"] == [3, 0]
        assert entry["channels_total"] == 4
        assert np.array_equal(_floats(entry["array"]), expected[[3, 0]])


def test_activation_grid(tiny_client: TestClient) -> None:
    status, body = _activations(tiny_client, "tiny", layers=["relu"])
    assert status == 200, body
    layers = body["layers"]
    assert isinstance(layers, list)
    (entry,) = layers
    grid = entry["grid"]
    assert entry["channels"] == [0, 1, 2, 3]
    assert entry["array"] is None
    assert (grid["rows"], grid["cols"], grid["tiles"], grid["color"]) == (2, 2, 4, "gray")
    th, tw = grid["tile"]
    assert _png(grid["data"]).shape == (2 * th + 1, 2 * tw + 1)


def test_activation_grid_multipart(client: TestClient) -> None:
    response = client.post(
        "/v1/models/efficientnet-lite0/activations",
        files={"image": ("a.png", encode(solid((10, 200, 30), 64, 64)), "image/png")},
        data={"layers": '["head/relu6"]'},
    )
    assert response.status_code == 200, response.text
    (entry,) = response.json()["layers"]
    assert entry["channels_total"] == 1280
    assert len(entry["channels"]) == 64
    assert entry["grid"]["tiles"] == 64
    assert _png(entry["grid"]["data"]).ndim == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"layers": ["nope"]},
        {"layers": ["logits"]},
        {"layers": ["conv"], "channels": [4]},
        {"layers": []},
        {"layers": ["conv"] * 9},
        {"layers": ["conv"], "channels": list(range(65))},
        {"layers": ["conv"], "format": "png"},
    ],
)
def test_activation_errors(tiny_client: TestClient, fields: dict[str, object]) -> None:
    status, body = _activations(tiny_client, "tiny", **fields)
    assert status == 422, body
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"]
