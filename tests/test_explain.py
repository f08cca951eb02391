"""Explanation methods on images whose answers are known, and CAM variants against numpy."""

import base64
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.imaging.decode import preprocess
from engines.methods.cam import channels_first, layer_gradients
from engines.methods.pipeline import TargetMap
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import LoadedModel
from schemas.explain import ExplainMethod
from service.settings import Settings
from tests.conftest import CPU
from tests.images import encode, photo
from tests.tiny_models import write_model_folder

SQUARE = (slice(2, 7), slice(9, 14))  # rows 2-6, columns 9-13 of a 16x16 image
RED = 0


def red_square_image() -> np.ndarray:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[SQUARE] = (200, 0, 0)
    return image


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("explain")
    folder = write_model_folder(root / "tiny")
    return LoadedModel("tiny", folder, CPU, cache_dir=root / "cache")


def explain(
    model: LoadedModel, method: str, targets: list[int] | None, **params: object
) -> list[TargetMap]:
    explainer = EXPLAINERS[method]
    tensor = preprocess([red_square_image()], model.config.input)
    parsed = explainer.params_model.model_validate(params)
    return explainer.explain(model, tensor, targets, 1, parsed).maps


def square_indicator() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[SQUARE] = 1.0
    return mask


# In the tiny CNN, logit c is mean(ReLU(input channel c)) over 16x16 pixels: every method's
# answer for the red class on a red square is a multiple of the square's indicator.
KNOWN = {
    "gradcam": 200 / 256,  # weight 1/256 on channel 0, whose activation is the red channel
    "xgradcam": 200 / 256,  # sum(G*A)/sum(A) = 1/256 as well
    "layercam": 200 / 256,
    "hirescam": 200 / 256,
    "saliency": 1 / 256,  # d mean(relu(x0)) / dx0 where x0 > 0
    "guided_backprop": 1 / 256,
    "gradient_x_input": 200 / 256,
    "integrated_gradients": 200 / 256,  # linear along the path from black
}


@pytest.mark.parametrize("method", sorted(KNOWN))
def test_each_method_finds_the_red_square(tiny_model: LoadedModel, method: str) -> None:
    (red_map,) = explain(tiny_model, method, [RED])
    assert red_map.target == RED
    np.testing.assert_allclose(
        red_map.heatmap, KNOWN[method] * square_indicator(), rtol=1e-4, atol=1e-7
    )


def test_gradcam_plus_plus_peaks_only_on_the_square(tiny_model: LoadedModel) -> None:
    (red_map,) = explain(tiny_model, "gradcam++", [RED])
    assert red_map.heatmap[SQUARE].min() > 0
    assert red_map.heatmap[square_indicator() == 0].max() == 0


def test_integrated_gradients_is_complete(tiny_model: LoadedModel) -> None:
    (ig,) = explain(tiny_model, "integrated_gradients", [RED], baseline="black", steps=8)
    clean = tiny_model.forward(preprocess([red_square_image()], tiny_model.config.input))[0]
    black = tiny_model.forward(np.zeros((1, 3, 16, 16), np.float32))[0]
    assert ig.heatmap.sum() == pytest.approx(clean[RED] - black[RED], rel=1e-4)


def test_smoothgrad_without_noise_is_saliency(tiny_model: LoadedModel) -> None:
    (smooth,) = explain(tiny_model, "smoothgrad", [RED], noise=0.0, samples=3)
    (plain,) = explain(tiny_model, "saliency", [RED])
    np.testing.assert_allclose(smooth.heatmap, plain.heatmap, rtol=1e-5)
    (noisy,) = explain(tiny_model, "smoothgrad", [RED], noise=0.1, samples=20)
    assert noisy.heatmap[SQUARE].mean() > 2 * noisy.heatmap[square_indicator() == 0].mean()


def test_a_class_absent_from_the_image_gets_an_empty_cam(tiny_model: LoadedModel) -> None:
    (green,) = explain(tiny_model, "gradcam", [1])
    assert not green.heatmap.any()


def test_top_k_targets_come_from_the_same_run(tiny_model: LoadedModel) -> None:
    maps = (
        EXPLAINERS["gradcam"]
        .explain(
            tiny_model,
            preprocess([red_square_image()], tiny_model.config.input),
            None,
            2,
            EXPLAINERS["gradcam"].params_model(),
        )
        .maps
    )
    assert maps[0].target == RED
    assert len(maps) == 2


def reference_cams(activations: np.ndarray, gradients: np.ndarray) -> dict[str, np.ndarray]:
    """Independent numpy formulas, over (C, h, w) arrays."""
    a, g = activations.astype(np.float64), gradients.astype(np.float64)

    def relu(x: np.ndarray) -> np.ndarray:
        rectified: np.ndarray = np.maximum(x, 0.0)
        return rectified

    gradcam = relu(np.einsum("c,chw->hw", g.mean(axis=(1, 2)), a))
    x_weights = np.einsum("chw,chw->c", g, a) / (a.sum(axis=(1, 2)) + 1e-7)
    alpha_num = g**2
    alpha_den = 2 * g**2 + a.sum(axis=(1, 2), keepdims=True) * g**3
    alpha = np.divide(alpha_num, alpha_den + 1e-7, out=np.zeros_like(g), where=g != 0)
    pp_weights = np.einsum("chw,chw->c", alpha, relu(g))
    return {
        "gradcam": gradcam,
        "gradcam++": relu(np.einsum("c,chw->hw", pp_weights, a)),
        "xgradcam": relu(np.einsum("c,chw->hw", x_weights, a)),
        "layercam": relu(np.einsum("chw,chw->hw", relu(g), a)),
        "hirescam": relu(np.einsum("chw,chw->hw", g, a)),
    }


@pytest.fixture(scope="module")
def lite0(default_model_dir: Path) -> LoadedModel:
    folder = default_model_dir / "efficientnet-lite0"
    return LoadedModel("efficientnet-lite0", folder, CPU, cache_dir=default_model_dir / ".cache")


def test_cam_variants_match_numpy_on_the_default_model(lite0: LoadedModel) -> None:
    tensor = preprocess([photo("chelsea")], lite0.config.input)
    targets = [281, 285]
    result = layer_gradients(lite0, tensor, targets, 1, "head/relu6")
    assert result.activation is not None
    assert result.grad_layer is not None
    activations = channels_first(result.activation, 1)[0]
    for method, expected in reference_cams(activations, result.grad_layer[0]).items():
        explainer = EXPLAINERS[method]
        maps = explainer.explain(lite0, tensor, targets, 1, explainer.params_model()).maps
        assert [m.target for m in maps] == targets
        upsampled = cv2.resize(expected.astype(np.float32), (224, 224))
        np.testing.assert_allclose(
            maps[0].heatmap, upsampled, rtol=1e-3, atol=1e-6 * upsampled.max()
        )


# Eyeballed once on an overlay: the cat's face in chelsea (451x300) lies in this box.
CAT_BOX = (slice(50, 290), slice(100, 360))


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(row), int(column)


def test_gradcam_for_the_cat_peaks_on_the_cat(client: TestClient) -> None:
    response = client.post(
        "/v1/models/efficientnet-lite0/explain",
        json={
            "image": base64.b64encode(encode(photo("chelsea"))).decode(),
            "method": "gradcam",
            "targets": [281],
            "output": {"format": "array"},
        },
    )
    assert response.status_code == 200, response.text
    heatmap = response.json()["explanations"][0]["heatmap"]
    assert heatmap["shape"] == [300, 451]
    values = np.frombuffer(base64.b64decode(heatmap["data"]), "<f4").reshape(300, 451)
    row, column = peak(values)
    assert CAT_BOX[0].start <= row < CAT_BOX[0].stop
    assert CAT_BOX[1].start <= column < CAT_BOX[1].stop


def test_the_engines_offer_exactly_the_methods_the_api_accepts() -> None:
    assert set(EXPLAINERS) == set(get_args(ExplainMethod))


def test_the_cli_and_the_service_run_sessions_with_the_same_options() -> None:
    settings = Settings(intra_op_threads=0, workers=1, spin_wait=False, inter_op_threads=2)
    options = settings.runtime_options()
    assert options.intra_op_threads == settings.threads_per_session >= 1
    assert (options.spin_wait, options.inter_op_threads) == (False, 2)
