"""Score-CAM, Ablation-CAM, Eigen-CAM, Eigen-Grad-CAM and GradientSHAP against the peers' own
implementations (pytorch-grad-cam, Captum) on the default model's weights, over real HTTP.

The references come from one run of tests/zoo/peer_references.py in the zoo venv per session
(ONNX_EXPLAIN_ZOO_PYTHON; skipped without it). Known answers on tiny graphs and batch-size
independence need no torch and always run.
"""

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from engines.errors import TooMuchWork
from engines.graphs.suffix import build_suffix_model
from engines.methods.cam import first_component
from engines.methods.forward_cam import AblationCam, ScoreCam, interpolation_matrix
from engines.methods.pipeline import WorkLimits
from engines.methods.saliency import GradientShap, gradient_shap_points
from engines.models.loaded import LoadedModel
from schemas.model_config import ModelConfig
from schemas.params import ForwardCamParams, GradientShapParams
from tests.conftest import CPU
from tests.images import encode, photo
from tests.tiny_models import write_model_folder

ZOO_PYTHON = os.environ.get("ONNX_EXPLAIN_ZOO_PYTHON", "")
ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet-lite0"
SCORECAM_LAYER = "blocks.1/project/conv"  # 24 channels: 24 passes, not the head's 1280
GRADIENTSHAP: dict[str, Any] = {"samples": 6, "seed": 11, "baseline": "black"}
MIN_CORRELATION = 0.98
ARRAY = {"format": "array", "normalize": "none", "size": "model"}

needs_zoo = pytest.mark.skipif(
    not ZOO_PYTHON, reason="ONNX_EXPLAIN_ZOO_PYTHON is unset: the peers run in the zoo venv"
)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def explain(client: TestClient, method: str, targets: list[int], **params: Any) -> list[Any]:
    body = {
        "image": base64.b64encode(encode(photo("chelsea"), ".png")).decode(),
        "method": method,
        "targets": targets,
        "params": params,
        "output": ARRAY,
    }
    response = client.post(f"/v1/models/{MODEL}/explain", json=body)
    assert response.status_code == 200, response.text
    maps = []
    for explanation in response.json()["explanations"]:
        heatmap = explanation["heatmap"]
        values = np.frombuffer(base64.b64decode(heatmap["data"]), "<f4")
        maps.append(values.reshape(heatmap["shape"]).astype(np.float64))
    return maps


@pytest.fixture(scope="session")
def peers(
    client: TestClient, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, np.ndarray]:
    """The peers' maps for the top-2 classes of the cat, from one zoo-venv run."""
    from engines.imaging.decode import preprocess

    config = ModelConfig.model_validate_json(
        (default_model_dir / MODEL / "config.json").read_text()
    )
    pixels = photo("chelsea")
    tensor = preprocess([pixels], config.input)
    black = preprocess([np.zeros_like(pixels)], config.input)
    top = client.post(
        f"/v1/models/{MODEL}/predict",
        json={"image": base64.b64encode(encode(pixels, ".png")).decode(), "top_k": 2},
    ).json()["predictions"]
    alphas, _ = gradient_shap_points(tensor, GRADIENTSHAP["samples"], 0.0, GRADIENTSHAP["seed"])
    folder = tmp_path_factory.mktemp("peers")
    np.savez(
        folder / "in.npz",
        tensor=tensor,
        baseline=black,
        targets=np.array([p["index"] for p in top]),
        gradientshap_alphas=alphas,
        spec=json.dumps({"scorecam_layer": SCORECAM_LAYER}),
    )
    subprocess.run(
        [ZOO_PYTHON, "-m", "tests.zoo.peer_references", folder / "in.npz", folder / "out.npz"],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    with np.load(folder / "out.npz") as data:
        found = {key: data[key] for key in data.files}
    found["targets"] = np.array([p["index"] for p in top])
    found["tensor"] = tensor
    return found


@needs_zoo
def test_the_peers_run_the_same_weights(client: TestClient, peers: dict[str, np.ndarray]) -> None:
    logits = peers["logits"]
    body = {"image": base64.b64encode(encode(photo("chelsea"), ".png")).decode(), "top_k": 2}
    top = client.post(f"/v1/models/{MODEL}/predict", json=body).json()["predictions"]
    assert [p["index"] for p in top] == np.argsort(-logits)[:2].tolist()


@needs_zoo
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("scorecam", {"layer": SCORECAM_LAYER}),
        ("ablationcam", {}),
    ],
)
def test_cams_equal_pytorch_grad_cam(
    client: TestClient, peers: dict[str, np.ndarray], method: str, params: dict[str, Any]
) -> None:
    targets = peers["targets"].tolist()
    targets = targets[:1] if method == "scorecam" else targets
    for target, ours in zip(targets, explain(client, method, targets, **params), strict=True):
        theirs = peers[f"{method}/{target}"]
        assert correlation(ours, theirs) >= MIN_CORRELATION, (method, target)


@needs_zoo
def test_eigencam_equals_pytorch_grad_cams_sign_fixed_projection(
    client: TestClient, peers: dict[str, np.ndarray]
) -> None:
    targets = peers["targets"].tolist()
    first, second = explain(client, "eigencam", targets)
    np.testing.assert_array_equal(first, second)  # no target: one map for every target
    assert correlation(first, peers["eigencam_signed"]) >= MIN_CORRELATION
    if not bool(peers["eigencam_flipped"]):  # EigenCAM keeps the SVD's sign; here it agrees
        assert correlation(first, peers["eigencam"]) >= MIN_CORRELATION


@needs_zoo
def test_eigengradcam_equals_pytorch_grad_cams_sign_fixed_projection(
    client: TestClient, peers: dict[str, np.ndarray]
) -> None:
    targets = peers["targets"].tolist()
    for target, ours in zip(targets, explain(client, "eigengradcam", targets), strict=True):
        assert correlation(ours, peers[f"eigengradcam_signed/{target}"]) >= MIN_CORRELATION
        if not bool(peers[f"eigengradcam_flipped/{target}"]):
            assert correlation(ours, peers[f"eigengradcam/{target}"]) >= MIN_CORRELATION


@needs_zoo
def test_gradientshap_equals_captum_with_the_same_alphas(
    client: TestClient, peers: dict[str, np.ndarray]
) -> None:
    targets = peers["targets"].tolist()[:1]
    maps = explain(client, "gradientshap", targets, reduction="sum", **GRADIENTSHAP)
    for target, ours in zip(targets, maps, strict=True):
        theirs = peers[f"gradientshap/{target}"].sum(axis=0)
        assert correlation(ours, theirs) >= MIN_CORRELATION, target


@needs_zoo
def test_deeplift_equals_captum_with_the_same_baseline(
    client: TestClient, peers: dict[str, np.ndarray]
) -> None:
    targets = peers["targets"].tolist()[:1]
    maps = explain(client, "deeplift", targets, reduction="sum", baseline="black")
    change = peers["logits"] - peers["baseline_logits"]
    for target, ours in zip(targets, maps, strict=True):
        theirs = peers[f"deeplift/{target}"].sum(axis=0)
        assert correlation(ours, theirs) >= MIN_CORRELATION, target
        # Both are complete: the attributions add up to the score's change from the baseline.
        assert ours.sum() == pytest.approx(change[target], rel=1e-3)
        assert theirs.sum() == pytest.approx(change[target], rel=1e-3)


# --- known answers on tiny graphs ------------------------------------------------------------


WEIGHTS = np.array([[1.0, -2.0, 0.5], [0.5, 3.0, -1.0], [0.2, 0.1, 0.3]])
BIAS = np.array([1.0, 2.0, 0.0])


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """input (1, 3, 8, 8) -> Relu `features` -> GlobalAveragePool -> Flatten -> Gemm: logit_k is
    W_k . (the channel means of Relu(x)) + b_k."""
    nodes = [
        helper.make_node("Relu", ["input"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(WEIGHTS.astype(np.float32), "w"),
            numpy_helper.from_array(BIAS.astype(np.float32), "b"),
        ],
    )
    folder = write_model_folder(tmp_path_factory.mktemp("linear") / "linear", size=8)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "model.onnx")
    return LoadedModel("linear", folder, CPU)


def tensor_of(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32).reshape(1, 3, 8, 8)


def test_linear_models_layer_is_the_relu(linear: LoadedModel) -> None:
    assert linear.default_layer == "features"


def test_ablation_weights_are_the_relative_drops_by_hand(linear: LoadedModel) -> None:
    # Zeroing channel c drops logit_k by W_kc m_c, m_c the channel's mean.
    image = np.stack([np.full((8, 8), 2.0), np.arange(64.0).reshape(8, 8), np.eye(8)])
    means = image.reshape(3, -1).mean(axis=1)
    logits = WEIGHTS @ means + BIAS
    result = AblationCam().explain(linear, tensor_of(image), [1], 1, ForwardCamParams())
    weights = WEIGHTS[1] * means / logits[1]
    cam = np.maximum(np.tensordot(weights, image, axes=1), 0)
    # The layer has the input's 8x8: the map is the CAM itself.
    np.testing.assert_allclose(result.maps[0].heatmap, cam, rtol=1e-5)


def test_score_cam_weights_are_the_softmax_of_masked_scores_by_hand(linear: LoadedModel) -> None:
    image = np.stack([np.eye(8) * 3.0, np.arange(64.0).reshape(8, 8), np.full((8, 8), 1.0)])
    result = ScoreCam().explain(linear, tensor_of(image), [0], 1, ForwardCamParams())
    scores = []
    for channel in image:
        mask = (channel - channel.min()) / (channel.max() - channel.min() + 1e-8)
        means = (image * mask).reshape(3, -1).mean(axis=1)
        scores.append(WEIGHTS[0] @ means + BIAS[0])
    weights = np.exp(scores) / np.exp(scores).sum()
    cam = np.maximum(np.tensordot(weights, image, axes=1), 0)
    np.testing.assert_allclose(result.maps[0].heatmap, cam, rtol=1e-5)


def test_forward_cams_do_not_depend_on_the_batch_size(linear: LoadedModel) -> None:
    image = tensor_of(np.random.default_rng(0).uniform(-1, 3, size=192))
    for explainer in (ScoreCam(), AblationCam()):
        maps = [
            explainer.explain(
                linear, image, [0, 1], 1, ForwardCamParams(), WorkLimits(memory_budget_bytes=b)
            ).maps
            for b in (1, 1 << 30)  # one channel a batch, then every channel in one
        ]
        for one, many in zip(*maps, strict=True):
            np.testing.assert_allclose(one.heatmap, many.heatmap, rtol=1e-5, atol=1e-6)


def test_forward_cams_refuse_more_channels_than_max_passes(linear: LoadedModel) -> None:
    image = tensor_of(np.ones(192))
    with pytest.raises(TooMuchWork):
        ScoreCam().explain(linear, image, [0], 1, ForwardCamParams(max_passes=2))


def test_suffix_takes_a_skip_connection_as_an_extra_input() -> None:
    # y = Relu(x) + x: after "r", the part also reads the model input.
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    suffix = build_suffix_model(helper.make_model(graph), "r", "y")
    assert suffix.boundary == ("x",)
    assert [i.name for i in suffix.model.graph.input] == ["r", "x"]
    assert [n.op_type for n in suffix.model.graph.node] == ["Add"]
    onnx.checker.check_model(suffix.model)


def test_first_component_is_the_rank_one_pattern_with_its_larger_side_positive() -> None:
    # Channels c * p: every position's channel vector lies along c; p is recovered up to its mean.
    pattern = np.array([[0.0, 1.0], [5.0, 2.0]])
    channels = np.array([1.0, -2.0, 0.5])
    features = channels[:, None, None] * pattern
    projection = first_component(features)
    centred = (pattern - pattern.mean()) * np.linalg.norm(channels)
    np.testing.assert_allclose(projection, centred, atol=1e-9)
    np.testing.assert_allclose(first_component(-features), centred, atol=1e-9)
    # More channels than positions: the other Gram matrix, the same answer.
    many = np.array([1.0, -2.0, 0.5, 3.0, 0.0, -1.0])
    wide = many[:, None, None] * pattern
    expected = (pattern - pattern.mean()) * np.linalg.norm(many)
    np.testing.assert_allclose(first_component(wide), expected, atol=1e-9)


def test_interpolation_matrix_aligns_corners() -> None:
    matrix = interpolation_matrix(5, 3)
    np.testing.assert_allclose(matrix @ np.array([0.0, 1.0, 4.0]), [0, 0.5, 1, 2.5, 4])


def test_gradientshap_on_a_linear_path_is_the_weights_times_the_difference(
    linear: LoadedModel,
) -> None:
    # Positive inputs keep the Relu open on the whole path from a zero baseline: the gradient
    # is constant, W_kc / 64 at every pixel of channel c, whatever the alphas.
    image = tensor_of(np.random.default_rng(1).uniform(0.5, 2.0, size=192))
    params = GradientShapParams(baseline="zeros", samples=3, seed=5, reduction="sum")
    result = GradientShap().explain(linear, image, [1], 1, params)
    expected = (WEIGHTS[1][:, None, None] / 64 * image[0]).sum(axis=0)
    np.testing.assert_allclose(result.maps[0].heatmap, expected, rtol=1e-5)


def two_layer_model(folder: Path) -> LoadedModel:
    """logit 0 = sum over pixels of Relu(x_0 - 1) - 2 Sigmoid(x_1), logit 1 = that of Sigmoid(x_1),
    logit 2 = that of x_2: input (1, 3, 8, 8) -> Sub -> Split -> Relu, Sigmoid -> ReduceSum ->
    MatMul."""
    shift = np.array([1.0, 0.0, 0.0], dtype=np.float32).reshape(1, 3, 1, 1)
    nodes = [
        helper.make_node("Sub", ["input", "shift"], ["shifted"]),
        helper.make_node("Split", ["shifted", "parts"], ["a", "b", "c"], axis=1),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Sigmoid", ["b"], ["sb"]),
        helper.make_node("Concat", ["ra", "sb", "c"], ["features"], axis=1),
        helper.make_node("ReduceSum", ["features", "axes"], ["sums"], keepdims=0),
        helper.make_node("MatMul", ["sums", "w"], ["logits"]),
    ]
    weights = np.array([[1.0, 0.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    graph = helper.make_graph(
        nodes,
        "two_layer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(shift, "shift"),
            numpy_helper.from_array(np.array([1, 1, 1], dtype=np.int64), "parts"),
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(weights, "w"),
        ],
    )
    folder = write_model_folder(folder, size=8)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "model.onnx")
    return LoadedModel("two_layer", folder, CPU)


def test_deeplift_rescales_each_nonlinearity_by_hand(tmp_path: Path) -> None:
    from engines.methods.saliency import DeepLift
    from schemas.params import DeepLiftParams

    model = two_layer_model(tmp_path / "two")
    rng = np.random.default_rng(2)
    image = rng.uniform(-2.0, 3.0, size=(1, 3, 8, 8)).astype(np.float32)
    image[0, 0, 0, 0] = 0.0  # x == x0 there: the ordinary derivative (0: Relu(-1) is flat)
    params = DeepLiftParams(baseline="zeros", reduction="sum")
    first, second, third = DeepLift().explain(model, image, [0, 1, 2], 1, params).maps
    x0, x1, x2 = image[0]
    # Rescale: (f(x) - f(0)) / (x - 0) times (x - 0) is just f(x) - f(0) at each pixel.
    relu = np.maximum(x0 - 1, 0) - 0.0
    sigmoid = 1 / (1 + np.exp(-x1)) - 0.5
    np.testing.assert_allclose(first.heatmap, relu - 2 * sigmoid, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second.heatmap, sigmoid, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(third.heatmap, x2, rtol=1e-6)
    clean = model.forward(image)[0]
    zero = model.forward(np.zeros_like(image))[0]
    for found, target in ((first, 0), (second, 1), (third, 2)):
        assert found.heatmap.sum() == pytest.approx(clean[target] - zero[target], rel=1e-5)


def test_deeplift_differs_from_gradient_times_input_where_a_relu_is_crossed(
    tmp_path: Path,
) -> None:
    from engines.methods.saliency import DeepLift, GradientTimesInput
    from schemas.params import DeepLiftParams, GradientTimesInputParams

    model = two_layer_model(tmp_path / "two")
    image = np.full((1, 3, 8, 8), 3.0, dtype=np.float32)
    params = DeepLiftParams(baseline="zeros", reduction="sum")
    (lift,) = DeepLift().explain(model, image, [0], 1, params).maps
    (plain,) = GradientTimesInput().explain(model, image, [0], 1, GradientTimesInputParams()).maps
    sigmoid = 1 / (1 + np.exp(-3.0))
    # Relu(3 - 1) - Relu(0 - 1) = 2, but slope 1 times 3 = 3; likewise for the sigmoid.
    np.testing.assert_allclose(lift.heatmap, 2.0 - 2 * (sigmoid - 0.5), rtol=1e-5)
    np.testing.assert_allclose(plain.heatmap, 3.0 - 2 * sigmoid * (1 - sigmoid) * 3, rtol=1e-5)


def test_deeplift_is_complete_on_the_default_model(default_model_dir: Path) -> None:
    from engines.imaging.decode import preprocess
    from engines.methods.pipeline import baseline_tensor
    from engines.methods.saliency import DeepLift
    from schemas.params import DeepLiftParams

    model = LoadedModel(MODEL, default_model_dir / MODEL, CPU)
    tensor = preprocess([photo("chelsea")], model.config.input)
    for baseline in ("black", "blur"):
        params = DeepLiftParams(baseline=baseline, reduction="sum")
        result = DeepLift().explain(model, tensor, [281, 285], 1, params)
        reference = baseline_tensor(model, tensor, baseline)
        change = model.forward(tensor)[0] - model.forward(reference)[0]
        for found in result.maps:
            assert found.heatmap.sum() == pytest.approx(change[found.target], rel=1e-3)


def test_too_many_channels_for_max_passes_is_a_clear_4xx(client: TestClient) -> None:
    body = {
        "image": base64.b64encode(encode(photo("chelsea"), ".png")).decode(),
        "method": "scorecam",
        "params": {"max_passes": 100},
    }
    response = client.post(f"/v1/models/{MODEL}/explain", json=body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert "1280 channels" in error["message"], error


def test_the_new_methods_are_in_the_support_table(client: TestClient) -> None:
    table = client.get(f"/v1/models/{MODEL}").json()["methods"]
    supported = {entry["method"]: entry["supported"] for entry in table}
    new = ("scorecam", "ablationcam", "eigencam", "eigengradcam", "deeplift", "gradientshap")
    assert all(supported[m] for m in new), supported


def test_ablation_feeds_a_skip_connection_its_clean_value(tmp_path: Path) -> None:
    # logits = W . mean(Relu(x) + x) + b: after `features`, the part also reads the input.
    nodes = [
        helper.make_node("Relu", ["input"], ["features"]),
        helper.make_node("Add", ["features", "input"], ["skip"]),
        helper.make_node("GlobalAveragePool", ["skip"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(WEIGHTS.astype(np.float32), "w"),
            numpy_helper.from_array(BIAS.astype(np.float32), "b"),
        ],
    )
    folder = write_model_folder(tmp_path / "residual", size=8)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "model.onnx")
    loaded = LoadedModel("residual", folder, CPU)
    image = np.random.default_rng(4).uniform(-1.0, 3.0, size=(3, 8, 8))
    params = ForwardCamParams(layer="features")
    (found,) = AblationCam().explain(loaded, tensor_of(image), [1], 1, params).maps
    relu = np.maximum(image, 0)
    means = relu.reshape(3, -1).mean(axis=1)
    clean = WEIGHTS[1] @ (means + image.reshape(3, -1).mean(axis=1)) + BIAS[1]
    weights = WEIGHTS[1] * means / clean
    expected = np.maximum(np.tensordot(weights, relu, axes=1), 0)
    np.testing.assert_allclose(found.heatmap, expected, rtol=1e-5, atol=1e-6)
