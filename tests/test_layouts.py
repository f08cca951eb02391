"""Feature-map layouts followed through the graph: an NHWC-input model with NCHW convolutions
inside (as Keras and tf2onnx export them) explains exactly like the same network written NCHW."""

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from engines.imaging.decode import preprocess
from engines.methods.occlusion import Occlusion
from engines.models.layers import LayerInfo, default_layer, spatial_layers
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions
from schemas.model_config import InputSpec
from schemas.params import OcclusionParams
from tests.conftest import make_client
from tests.images import encode
from tests.tiny_models import OPSET, write_model_folder

SIZE = 8
CHANNELS = 4  # differs from SIZE, so a map read along the wrong axis has the wrong length
CPU = RuntimeOptions(providers="cpu")
NHWC_TO_NCHW_LAYERS = {
    "conv1": "conv1",
    "relu1": "relu1",
    "biased": "biased",
    "conv2": "conv2",
    "relu2": "relu2",
    "feat": "relu2",
}
"""Each layer of the NHWC model -> the twin's layer holding the same values."""


def weights() -> dict[str, np.ndarray]:
    """Conv1's channel 0 is the pixel brightness (centre taps only: no bleed across an edge),
    conv2's channel 0 passes it on and class 0's logit is its mean; the rest is random."""
    rng = np.random.default_rng(7)
    conv1 = rng.normal(size=(CHANNELS, 3, 3, 3)).astype(np.float32)
    conv1[0] = 0.0
    conv1[0, :, 1, 1] = 1.0 / 3.0
    # Mostly positive weights keep relu2's channels and class 1's gradients alive.
    conv2 = np.abs(rng.normal(size=(CHANNELS, CHANNELS, 1, 1))).astype(np.float32)
    conv2[0] = 0.0
    conv2[0, 0] = 1.0
    fc = rng.normal(size=(3, CHANNELS)).astype(np.float32)
    fc[0] = (1.0, 0.0, 0.0, 0.0)
    fc[1] = np.abs(fc[1])
    return {
        "conv1_w": conv1,
        "conv1_b": np.zeros(CHANNELS, np.float32),
        "bias": np.array([0.0, 0.3, -0.2, 0.1], np.float32),
        "conv2_w": conv2,
        "conv2_b": np.array([0.0, 0.1, 0.2, 0.05], np.float32),
        "fc_w": fc,
        "fc_b": np.zeros(3, np.float32),
    }


def _save(
    nodes: list[onnx.NodeProto],
    shape: list[int | str],
    initializers: dict[str, np.ndarray],
    path: Path,
    classes: int = 3,
) -> None:
    graph = helper.make_graph(
        nodes,
        path.parent.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def keras_model(path: Path) -> None:
    """NHWC in; Transpose, Conv, Relu; back to NHWC for a per-channel bias; Transpose, Conv,
    Relu, back to NHWC; ReduceMean over H and W (Keras' GlobalAveragePooling2D); Gemm."""
    found = weights()
    found["bias"] = found["bias"].reshape(1, 1, 1, CHANNELS)
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "conv1_w", "conv1_b"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Transpose", ["relu1"], ["relu1_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Add", ["relu1_nhwc", "bias"], ["biased"]),
        helper.make_node("Transpose", ["biased"], ["biased_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["biased_nchw", "conv2_w", "conv2_b"], ["conv2"]),
        helper.make_node("Relu", ["conv2"], ["relu2"]),
        helper.make_node("Transpose", ["relu2"], ["feat"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["feat"], ["pooled"], axes=[1, 2], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    _save(nodes, ["N", SIZE, SIZE, 3], found, path)


def twin_model(path: Path) -> None:
    """The same network written NCHW throughout."""
    found = weights()
    found["bias"] = found["bias"].reshape(1, CHANNELS, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "conv1_w", "conv1_b"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Add", ["relu1", "bias"], ["biased"]),
        helper.make_node("Conv", ["biased", "conv2_w", "conv2_b"], ["conv2"]),
        helper.make_node("Relu", ["conv2"], ["relu2"]),
        helper.make_node("GlobalAveragePool", ["relu2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    _save(nodes, ["N", 3, SIZE, SIZE], found, path)


def unknown_layouts_model(path: Path) -> None:
    """NCHW in; a 1x1 Conv to SIZE channels (so C == H == W and only the graph tells the axes
    apart), scaled by a (1, C, 1, 1) constant; then tensors whose layout cannot be told."""
    rng = np.random.default_rng(1)
    initializers: dict[str, np.ndarray] = {
        "conv_w": rng.normal(size=(SIZE, 3, 1, 1)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, size=(1, SIZE, 1, 1)).astype(np.float32),
        "same_shape": np.array([0, SIZE, SIZE, SIZE], np.int64),
        "fc_w": rng.normal(size=(3, SIZE**3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["conv"]),
        helper.make_node("Mul", ["conv", "scale"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["scaled_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Add", ["scaled", "scaled_nhwc"], ["mixed"]),
        helper.make_node("Transpose", ["scaled"], ["swapped"], perm=[0, 1, 3, 2]),
        helper.make_node("Reshape", ["scaled", "same_shape"], ["reshaped"]),
        helper.make_node("Relu", ["reshaped"], ["reshaped_relu"]),
        helper.make_node("Sum", ["mixed", "swapped", "reshaped_relu"], ["total"]),
        helper.make_node("Flatten", ["total"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1),
    ]
    _save(nodes, ["N", 3, SIZE, SIZE], initializers, path)


def nhwc_pooled_by_gap_model(path: Path) -> None:
    """The Keras model's head with GlobalAveragePool (which averages axes 2 and 3) applied to
    the NHWC `feat`: a model that runs, but whose pooling is not over space."""
    found = weights()
    found["bias"] = found["bias"].reshape(1, 1, 1, CHANNELS)
    found["fc_w"] = np.random.default_rng(2).normal(size=(3, SIZE)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "conv1_w", "conv1_b"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Transpose", ["relu1"], ["feat"], perm=[0, 2, 3, 1]),
        helper.make_node("GlobalAveragePool", ["feat"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    del found["conv2_w"], found["conv2_b"], found["bias"]
    _save(nodes, ["N", SIZE, SIZE, 3], found, path)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    for name, layout, build in [
        ("keras", "NHWC", keras_model),
        ("twin", "NCHW", twin_model),
        ("unknown", "NCHW", unknown_layouts_model),
        ("gap-nhwc", "NHWC", nhwc_pooled_by_gap_model),
    ]:
        folder = write_model_folder(root / name, layout=layout, size=SIZE, scale=1 / 255)
        build(folder / "model.onnx")
    return root


@pytest.fixture(scope="module")
def client(repository: Path) -> Iterator[TestClient]:
    with make_client(repository) as client:
        yield client


def random_image() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def left_half_bright() -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[:, : SIZE // 2] = 230
    return image


def b64(image: np.ndarray) -> str:
    return base64.b64encode(encode(image)).decode()


def floats(array: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(array["data"]), "<f4").reshape(array["shape"])


def explain(client: TestClient, model: str, image: np.ndarray, **fields: object) -> np.ndarray:
    """The first explanation's heatmap as an array."""
    body = {"image": b64(image), "output": {"format": "array", "normalize": "none"}, **fields}
    response = client.post(f"/v1/models/{model}/explain", json=body)
    assert response.status_code == 200, response.text
    return floats(response.json()["explanations"][0]["heatmap"])


def test_the_layer_list_follows_each_tensors_layout(client: TestClient) -> None:
    layers = client.get("/v1/models/keras").json()["layers"]
    assert [(layer["name"], layer["op_type"], layer["layout"]) for layer in layers] == [
        ("x_nchw", "Transpose", "NCHW"),
        ("conv1", "Conv", "NCHW"),
        ("relu1", "Relu", "NCHW"),
        ("relu1_nhwc", "Transpose", "NHWC"),
        ("biased", "Add", "NHWC"),
        ("biased_nchw", "Transpose", "NCHW"),
        ("conv2", "Conv", "NCHW"),
        ("relu2", "Relu", "NCHW"),
        ("feat", "Transpose", "NHWC"),
    ]
    assert layers[2]["shape"] == ["N", CHANNELS, SIZE, SIZE]
    assert layers[4]["shape"] == ["N", SIZE, SIZE, CHANNELS]
    twin = client.get("/v1/models/twin").json()["layers"]
    assert {layer["layout"] for layer in twin} == {"NCHW"}


def test_tensors_of_unknown_layout_are_not_offered(client: TestClient, repository: Path) -> None:
    info = client.get("/v1/models/unknown").json()
    assert [(layer["name"], layer["layout"]) for layer in info["layers"]] == [
        ("conv", "NCHW"),
        ("scaled", "NCHW"),
        ("scaled_nhwc", "NHWC"),
    ]
    assert info["default_layer"] == "scaled_nhwc"
    for layer in ("mixed", "swapped", "reshaped", "total"):
        response = client.post(
            "/v1/models/unknown/explain",
            json={"image": b64(random_image()), "method": "gradcam", "params": {"layer": layer}},
        )
        assert response.status_code == 422, response.text
        assert "unknown layer" in response.json()["error"]["message"]
    # The same graph read as NHWC: the Conv's output is NCHW whatever came in, the rest follows.
    model = onnx.load(str(repository / "unknown" / "model.onnx"))
    spec = LoadedModel("unknown", repository / "unknown", CPU).config.input
    nhwc = spec.model_copy(update={"layout": "NHWC"})
    assert [layer.name for layer in spatial_layers(model, nhwc)] == [
        "conv",
        "scaled",
        "scaled_nhwc",
    ]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
@pytest.mark.parametrize("layer", sorted(NHWC_TO_NCHW_LAYERS))
def test_cams_of_the_nhwc_model_equal_the_nchw_twins(
    client: TestClient, method: str, layer: str
) -> None:
    image = random_image()
    params = {"layer": layer}
    twin_params = {"layer": NHWC_TO_NCHW_LAYERS[layer]}
    keras = explain(client, "keras", image, method=method, targets=[1], params=params)
    twin = explain(client, "twin", image, method=method, targets=[1], params=twin_params)
    assert np.abs(twin).max() > 1e-3
    np.testing.assert_allclose(keras, twin, rtol=1e-4, atol=1e-6)


def test_gradcam_of_the_nhwc_model_is_bright_where_the_image_is(client: TestClient) -> None:
    """Class 0's logit is the mean brightness: its Grad-CAM is the brightness, left half only."""
    heatmap = explain(client, "keras", left_half_bright(), method="gradcam", targets=[0])
    assert heatmap.shape == (SIZE, SIZE)
    # Grad-CAM weighs channel 0 by d(logit 0)/d(feat) = 1 / (H * W), the others by 0.
    brightness = 230 / 255
    np.testing.assert_allclose(heatmap[:, : SIZE // 2], brightness / SIZE**2, rtol=1e-5)
    assert heatmap[:, SIZE // 2 :].max() == 0.0
    default = client.get("/v1/models/keras").json()["default_layer"]
    assert default == "feat"


def test_classic_cam_of_the_nhwc_model_equals_the_twins(client: TestClient) -> None:
    image = random_image()
    keras = explain(client, "keras", image, method="cam", targets=[2])
    twin = explain(client, "twin", image, method="cam", targets=[2])
    assert np.abs(twin).max() > 1e-3
    np.testing.assert_allclose(keras, twin, rtol=1e-4, atol=1e-6)


def test_classic_cam_refuses_a_pooling_that_is_not_over_space(client: TestClient) -> None:
    response = client.post(
        "/v1/models/gap-nhwc/explain", json={"image": b64(random_image()), "method": "cam"}
    )
    assert response.status_code == 422, response.text
    assert "spatial axes" in response.json()["error"]["message"]


def test_activation_maps_of_the_nhwc_model_equal_the_twins(client: TestClient) -> None:
    def maps(model: str, layers: list[str]) -> list[dict[str, Any]]:
        response = client.post(
            f"/v1/models/{model}/activations",
            json={"image": b64(random_image()), "layers": layers, "format": "array"},
        )
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["layers"]
        return found

    keras = maps("keras", sorted(NHWC_TO_NCHW_LAYERS))
    for ours in keras:
        (theirs,) = maps("twin", [NHWC_TO_NCHW_LAYERS[ours["layer"]]])
        assert ours["channels_total"] == theirs["channels_total"] == CHANNELS
        assert ours["channels"] == list(range(CHANNELS))
        ours_maps = floats(ours["array"])
        assert ours_maps.shape == (CHANNELS, SIZE, SIZE)
        assert np.abs(ours_maps).max() > 1e-3
        np.testing.assert_allclose(ours_maps, floats(theirs["array"]), rtol=1e-5, atol=1e-6)
    grid = client.post(
        "/v1/models/keras/activations",
        json={"image": b64(random_image()), "layers": ["feat"]},
    ).json()["layers"][0]["grid"]
    assert grid["tiles"] == CHANNELS


@pytest.mark.parametrize("layer", ["relu1", "biased", "feat"])
def test_feature_dip_of_the_nhwc_model_equals_the_twins(client: TestClient, layer: str) -> None:
    image = random_image()
    params = {"window": 3, "stride": 1, "score": "feature_dip", "value": 0}
    keras = explain(client, "keras", image, method="occlusion", params={**params, "layer": layer})
    twin_layer = NHWC_TO_NCHW_LAYERS[layer]
    twin = explain(
        client, "twin", image, method="occlusion", params={**params, "layer": twin_layer}
    )
    assert np.abs(twin).max() > 1e-3
    np.testing.assert_allclose(keras, twin, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", ["relu2", "biased"])
def test_feature_dip_copies_in_the_graph_match_copies_in_numpy(
    repository: Path, layer: str
) -> None:
    """The CUDA path (copies made in the graph) run on the CPU, for a layer whose layout is not
    the input's (relu2) and for one whose layout is (biased)."""
    model = LoadedModel("keras", repository / "keras", CPU)
    tensor = preprocess([random_image()], model.config.input)
    parsed = OcclusionParams.model_validate(
        {"window": 3, "stride": 1, "score": "feature_dip", "value": 0, "layer": layer}
    )
    on_host = Occlusion(copies_on_device=False).explain(model, tensor, [0], 1, parsed)
    on_device = Occlusion(copies_on_device=True).explain(model, tensor, [0], 1, parsed)
    (host_map,) = on_host.maps
    (device_map,) = on_device.maps
    assert np.abs(host_map.heatmap).max() > 1e-3
    np.testing.assert_allclose(device_map.heatmap, host_map.heatmap, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["relu2", "feat", "biased"])
def test_layer_channels_of_the_nhwc_model_maximize_like_the_twins(
    client: TestClient, layer: str
) -> None:
    body = {
        "target": 1,
        "steps": 5,
        "jitter": 0,
        "blur_every": 2,
        "l2_decay": 0.0,
        "clip": False,
        "array": True,
    }
    keras = client.post("/v1/models/keras/maximize", json={**body, "layer": layer})
    twin_layer = NHWC_TO_NCHW_LAYERS[layer]
    twin = client.post("/v1/models/twin/maximize", json={**body, "layer": twin_layer})
    assert keras.status_code == 200, keras.text
    assert twin.status_code == 200, twin.text
    ours, theirs = keras.json(), twin.json()
    assert ours["label"] == f"{layer}[1]"
    np.testing.assert_allclose(ours["scores"], theirs["scores"], rtol=1e-4, atol=1e-6)
    assert ours["scores"][-1] > ours["scores"][0]
    ours_tensor = floats(ours["array"])
    assert ours_tensor.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(
        ours_tensor.transpose(0, 3, 1, 2), floats(theirs["array"]), rtol=1e-4, atol=1e-5
    )


def test_a_channel_past_the_layers_own_channel_count_is_refused(client: TestClient) -> None:
    """relu2 is (N, 4, 8, 8): channel 5 exists only along its width."""
    response = client.post(
        "/v1/models/keras/maximize", json={"target": 5, "layer": "relu2", "steps": 1}
    )
    assert response.status_code == 422, response.text
    assert "out of range" in response.json()["error"]["message"]


def _layers_of(
    nodes: list[onnx.NodeProto], arrays: dict[str, np.ndarray], opset: int = OPSET
) -> list[LayerInfo]:
    """The spatial layers of a graph from x [N, 3, SIZE, SIZE] to `pooled`."""
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return spatial_layers(model, InputSpec(name="x", height=SIZE, width=SIZE))


def test_a_residual_sum_with_a_branch_of_unknown_layout_takes_the_known_ones() -> None:
    """x + f(x) where f went through a Reshape (GroupNorm as dynamo exports it): the sum's axes
    are the Conv output's, so it is an NCHW layer, and the last one (the default). (The branch
    is reshaped back to the Conv output's own shape, so it is NCHW too.)"""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "w": rng.normal(size=(CHANNELS, 3, 1, 1)).astype(np.float32),
        "grouped": np.array([0, 1, -1], np.int64),
        "back": np.array([0, CHANNELS, SIZE, SIZE], np.int64),
        "s": np.ones(1, np.float32),
        "b": np.zeros(1, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"]),
        helper.make_node("Reshape", ["conv", "grouped"], ["flat"]),
        helper.make_node("InstanceNormalization", ["flat", "s", "b"], ["normed"]),
        helper.make_node("Reshape", ["normed", "back"], ["branch"]),
        helper.make_node("Add", ["conv", "branch"], ["residual"]),
        helper.make_node("GlobalAveragePool", ["residual"], ["pooled"]),
    ]
    layers = _layers_of(nodes, arrays)
    assert [(layer.name, layer.layout) for layer in layers] == [
        ("conv", "NCHW"),
        ("branch", "NCHW"),
        ("residual", "NCHW"),
    ]


@pytest.mark.parametrize(("weight_rank", "expected"), [(2, "NHWC"), (3, None)])
def test_a_channels_last_matmul_by_a_weight_matrix_keeps_the_layout(
    weight_rank: int, expected: str | None
) -> None:
    """MambaOut's and ConvNeXt's blocks run their pointwise layers as MatMuls on channels-last
    maps: one by a weight matrix is a 1x1 convolution, so the block's residual sum is an NHWC
    layer (and the default); a batched MatMul mixes positions and gives no layout."""
    rng = np.random.default_rng(0)
    weight_shape = (CHANNELS, 6) if weight_rank == 2 else (SIZE, CHANNELS, CHANNELS)
    arrays: dict[str, np.ndarray] = {
        "w": rng.normal(size=(CHANNELS, 3, 1, 1)).astype(np.float32),
        "fc": rng.normal(size=weight_shape).astype(np.float32),
        "axes": np.array([1, 2], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"]),
        helper.make_node("Transpose", ["conv"], ["last"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["last", "fc"], ["mixed"]),
        helper.make_node("ReduceMean", ["mixed", "axes"], ["pooled"], keepdims=0),
    ]
    layers = _layers_of(nodes, arrays, opset=18)
    layouts = {layer.name: layer.layout for layer in layers}
    assert layouts.get("last") == "NHWC"
    assert layouts.get("mixed") == expected


@pytest.mark.parametrize(("kernel", "expected"), [(1, "features"), (3, "scores")])
def test_a_classifying_1x1_conv_is_not_the_default_layer(kernel: int, expected: str) -> None:
    """SqueezeNet classifies with a 1x1 Conv into one channel per class before pooling: those
    are class-score maps, and Grad-CAM's default is the feature map the Conv reads. A wider
    kernel is an ordinary last layer."""
    classes = 5
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=(CHANNELS, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(
            rng.normal(size=(classes, CHANNELS, kernel, kernel)).astype(np.float32), "w2"
        ),
    ]
    pad = [kernel // 2] * 4
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("Conv", ["features", "w2"], ["class_maps"], pads=pad),
        helper.make_node("Relu", ["class_maps"], ["scores"]),
        helper.make_node("GlobalAveragePool", ["scores"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "squeeze",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    layers = spatial_layers(model, InputSpec(name="x", height=SIZE, width=SIZE))
    assert layers[-1].name == "scores"
    assert default_layer(model, layers, classes) == expected
    assert default_layer(model, layers, classes + 1) == "scores"


@pytest.mark.parametrize(("back", "expected"), [("same", "NCHW"), ("other", None)])
def test_a_map_reshaped_back_after_group_norm_keeps_its_layout(
    back: str, expected: str | None
) -> None:
    """GroupNorm as torch exports it: Reshape to [N, G, -1], InstanceNormalization, Reshape
    back to the map's shape, scale and shift. Back to the same shape, every element is where it
    was (ResNetV2's final norm is its Grad-CAM layer); to another shape, no layout is known."""
    rng = np.random.default_rng(0)
    back_shape = [0, CHANNELS, SIZE, SIZE] if back == "same" else [0, CHANNELS, SIZE // 2, 2 * SIZE]
    arrays: dict[str, np.ndarray] = {
        "w": rng.normal(size=(CHANNELS, 3, 1, 1)).astype(np.float32),
        "groups": np.array([0, 2, -1], np.int64),
        "ones": np.ones(2, np.float32),
        "zeros": np.zeros(2, np.float32),
        "back": np.array(back_shape, np.int64),
        "gamma": rng.normal(size=(CHANNELS, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv"]),
        helper.make_node("Reshape", ["conv", "groups"], ["grouped"]),
        helper.make_node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"]),
        helper.make_node("Reshape", ["normed", "back"], ["map"]),
        helper.make_node("Mul", ["map", "gamma"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["act"]),
        helper.make_node("GlobalAveragePool", ["act"], ["pooled"]),
    ]
    layers = _layers_of(nodes, arrays, opset=18)
    layouts = {layer.name: layer.layout for layer in layers}
    assert "grouped" not in layouts
    assert "normed" not in layouts
    assert layouts.get("act") == expected
    assert layouts.get("map") == expected


@pytest.mark.parametrize(
    ("padding", "expected"),
    [("window", ["conv"]), ("border", ["conv", "conv2"])],
)
def test_maps_padded_past_the_image_are_not_layers(padding: str, expected: list[str]) -> None:
    """Window attention pads a map smaller than its window (EfficientViT-M's last stage at 64
    px: 1x1 padded to 4x4) and slices it back: the padded maps reach past the image and were
    Grad-CAM's default. A Keras border Pad is not a layer either; the Conv after it is."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "w1": rng.normal(size=(CHANNELS, 3, 2, 2)).astype(np.float32),
        "w2": rng.normal(size=(CHANNELS, CHANNELS, 4, 4)).astype(np.float32),
        "w3": rng.normal(size=(CHANNELS, CHANNELS, 3, 3)).astype(np.float32),
        "to_window": np.array([0, 0, 0, 0, 0, 0, 3, 3], np.int64),
        "border": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "starts": np.array([0, 0], np.int64),
        "ends": np.array([1, 1], np.int64),
        "axes": np.array([2, 3], np.int64),
    }
    nodes = [helper.make_node("Conv", ["x", "w1"], ["conv"], strides=[2, 2])]  # 4x4
    if padding == "window":
        nodes += [
            helper.make_node("Conv", ["conv", "w2"], ["squeezed"], strides=[4, 4]),  # 1x1
            helper.make_node("Pad", ["squeezed", "to_window"], ["window"]),  # 4x4
            helper.make_node("Relu", ["window"], ["attended"]),
            helper.make_node("Slice", ["attended", "starts", "ends", "axes"], ["unpadded"]),
            helper.make_node("GlobalAveragePool", ["unpadded"], ["pooled"]),
        ]
    else:
        nodes += [
            helper.make_node("Pad", ["conv", "border"], ["bordered"]),  # 6x6
            helper.make_node("Conv", ["bordered", "w3"], ["conv2"]),  # 4x4
            helper.make_node("GlobalAveragePool", ["conv2"], ["pooled"]),
        ]
    model_layers = _layers_of(nodes, arrays, opset=18)
    assert [layer.name for layer in model_layers] == expected
