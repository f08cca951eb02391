"""Deletion and insertion scores (RISE) against a plain numpy implementation of the definition.

The reference runs its own onnxruntime session on the default model's file, one copy at a
time, with its own normalisation, ranking and trapezoid rule; only the definition is shared.
"""

import base64
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from engines.imaging.decode import fit_to_input
from engines.methods.metrics import faithfulness
from engines.methods.pipeline import WorkLimits
from engines.models.loaded import LoadedModel, read_config
from engines.runtime.session import RuntimeOptions
from tests.images import encode, photo

MODEL = "efficientnet-lite0"
STEPS = 8


def reference_curve(
    folder: Path, pixels: np.ndarray, heatmap: np.ndarray, target: int, kind: str, steps: int
) -> tuple[np.ndarray, float]:
    session = ort.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    spec = read_config(folder).input
    height, width = pixels.shape[:2]
    ranked = sorted(range(height * width), key=lambda i: -float(heatmap.ravel()[i]))
    if kind == "deletion":
        start, source = pixels, np.full_like(pixels, 128)
    else:
        start, source = cv2.GaussianBlur(pixels, (0, 0), 5), pixels
    scores = []
    for k in range(steps + 1):
        image = start.copy().reshape(-1, 3)
        changed = ranked[: k * height * width // steps]
        image[changed] = source.reshape(-1, 3)[changed]
        x = image.reshape(height, width, 3).astype(np.float64) * spec.scale
        x = (x - np.asarray(spec.mean)) / np.asarray(spec.std)
        (logits,) = session.run(None, {feed.name: x.transpose(2, 0, 1)[None].astype(np.float32)})
        e = np.exp(logits[0] - logits[0].max())
        scores.append(e[target] / e.sum())
    curve = np.asarray(scores)
    auc = sum((curve[k] + curve[k + 1]) / 2 / steps for k in range(steps))
    return curve, float(auc)


def tied_map(height: int, width: int) -> np.ndarray:
    """A blob on the cat's face, quantised to four levels so that ties are everywhere."""
    ys, xs = np.mgrid[0:height, 0:width]
    blob = np.exp(-((ys - 0.35 * height) ** 2 + (xs - 0.45 * width) ** 2) / (0.05 * height**2))
    levels: np.ndarray = (np.round(blob * 3) / 3).astype(np.float32)
    return levels


@pytest.fixture(scope="module")
def model(default_model_dir: Path) -> LoadedModel:
    return LoadedModel(MODEL, default_model_dir / MODEL, RuntimeOptions(providers="cpu"))


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_curves_equal_the_definition_in_plain_numpy(
    model: LoadedModel, default_model_dir: Path, kind: str
) -> None:
    pixels = fit_to_input(photo("chelsea"), model.config.input)
    heatmap = tied_map(*pixels.shape[:2])
    (curve,) = faithfulness(model, pixels, heatmap, 281, [kind], STEPS).values()  # type: ignore[list-item]
    scores, auc = reference_curve(default_model_dir / MODEL, pixels, heatmap, 281, kind, STEPS)
    np.testing.assert_allclose(curve.fractions, np.arange(STEPS + 1) / STEPS)
    np.testing.assert_allclose(curve.scores, scores, atol=1e-5)
    assert curve.auc == pytest.approx(auc, abs=1e-5)
    # The curve runs from the clean image (deletion) or its blur (insertion) to the other end.
    clean = scores[0] if kind == "deletion" else scores[-1]
    assert clean > 0.1  # chelsea is a cat to this model: tabby is among its top classes


def test_batches_do_not_change_the_curve(model: LoadedModel) -> None:
    pixels = fit_to_input(photo("chelsea"), model.config.input)
    heatmap = tied_map(*pixels.shape[:2])
    whole = faithfulness(model, pixels, heatmap, 281, ["deletion"], STEPS)["deletion"]
    one_copy = WorkLimits(memory_budget_bytes=pixels.nbytes * 4 * 32)
    small = faithfulness(model, pixels, heatmap, 281, ["deletion"], STEPS, one_copy)["deletion"]
    np.testing.assert_allclose(small.scores, whole.scores, atol=1e-6)


def test_a_map_of_the_wrong_size_is_refused(model: LoadedModel) -> None:
    from engines.errors import InvalidParameters

    pixels = fit_to_input(photo("chelsea"), model.config.input)
    with pytest.raises(InvalidParameters, match="cannot rank"):
        faithfulness(model, pixels, np.zeros((7, 7)), 281, ["deletion"])


def explain_body(**fields: Any) -> dict[str, Any]:
    return {
        "image": base64.b64encode(encode(photo("chelsea"))).decode(),
        "method": "gradcam",
        "targets": [281],
        "output": {"format": "array", "normalize": "none", "size": "model"},
        **fields,
    }


def test_every_explanation_carries_its_scores_over_http(
    client: TestClient, default_model_dir: Path
) -> None:
    body = explain_body(metrics=["deletion", "insertion"], metric_steps=STEPS, curves=True)
    response = client.post(f"/v1/models/{MODEL}/explain", json=body)
    assert response.status_code == 200, response.text
    (explanation,) = response.json()["explanations"]
    heatmap = explanation["heatmap"]
    shape = tuple(heatmap["shape"])
    cam = np.frombuffer(base64.b64decode(heatmap["data"]), "<f4").reshape(shape)
    metrics = explanation["metrics"]
    spec = read_config(default_model_dir / MODEL).input
    pixels = fit_to_input(photo("chelsea"), spec)
    for kind in ("deletion", "insertion"):
        scores, auc = reference_curve(default_model_dir / MODEL, pixels, cam, 281, kind, STEPS)
        assert metrics[f"{kind}_auc"] == pytest.approx(auc, abs=1e-4)
        np.testing.assert_allclose(metrics[f"{kind}_curve"], scores, atol=1e-4)
    # Deletion starts from the clean image, so its first point is the predicted probability.
    predicted = {p["index"]: p["score"] for p in response.json()["predictions"]}
    assert metrics["deletion_curve"][0] == pytest.approx(predicted[281], abs=1e-5)


def test_without_metrics_there_are_none(client: TestClient) -> None:
    response = client.post(f"/v1/models/{MODEL}/explain", json=explain_body())
    assert response.status_code == 200, response.text
    assert response.json()["explanations"][0]["metrics"] is None


@pytest.mark.parametrize(
    "fields",
    [
        {"metrics": ["deletion", "deletion"]},
        {"metrics": ["sufficiency"]},
        {"metrics": ["deletion"], "metric_steps": 0},
        {"metrics": ["deletion"], "metric_steps": 10_000},
    ],
)
def test_bad_metric_requests_are_refused(client: TestClient, fields: dict[str, Any]) -> None:
    response = client.post(f"/v1/models/{MODEL}/explain", json=explain_body(**fields))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
