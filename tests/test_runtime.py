from pathlib import Path

import numpy as np
import pytest

from engines.errors import InvalidParameters, ModelNotFound, ModelNotReady
from engines.models.loaded import LoadedModel, softmax
from engines.models.repository import ModelRepository, ModelState
from tests.conftest import CPU
from tests.images import solid
from tests.tiny_models import write_model_folder

RGB = (40, 120, 200)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("color", ["RGB", "BGR"])
def test_preprocessing_reaches_the_model_as_declared(
    tmp_path: Path, layout: str, color: str
) -> None:
    mean = (0.1, 0.2, 0.3)
    std = (0.5, 0.25, 2.0)
    folder = write_model_folder(
        tmp_path / "m",
        "channel_mean",
        layout=layout,
        color=color,
        scale=1 / 255,
        mean=mean,
        std=std,
        output="probabilities",
    )
    model = LoadedModel("m", folder, CPU)
    means = model.probabilities([solid(RGB, 40, 24)])[0]
    channels = RGB if color == "RGB" else RGB[::-1]
    expected = [(c / 255 - m) / s for c, m, s in zip(channels, mean, std, strict=True)]
    np.testing.assert_allclose(means, expected, rtol=1e-5)


def test_logits_become_probabilities(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "m", "channel_mean", output="logits")
    model = LoadedModel("m", folder, CPU)
    probabilities = model.probabilities([solid((1, 2, 3))])[0]
    np.testing.assert_allclose(probabilities, softmax(np.array([1.0, 2.0, 3.0])), rtol=1e-5)
    top = model.predict([solid((1, 2, 3))], top_k=2)[0]
    assert [(p.index, p.label) for p in top] == [(2, "blue"), (1, "green")]
    assert top[0].score == pytest.approx(probabilities[2])


def test_batch_results_match_single_images(tmp_path: Path) -> None:
    model = LoadedModel("m", write_model_folder(tmp_path / "m"), CPU)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8) for _ in range(3)]
    together = model.probabilities(images)
    for image, row in zip(images, together, strict=True):
        np.testing.assert_allclose(model.probabilities([image])[0], row, rtol=1e-5, atol=1e-7)


def test_small_cnn_logits_match_numpy(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    folder = write_model_folder(tmp_path / "m", size=8)
    model = LoadedModel("m", folder, CPU)
    weights = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(folder / "model.onnx")).graph.initializer
    }
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((4, 8, 8), dtype=np.float64)
    for o in range(4):
        for i in range(8):
            for j in range(8):
                conv[o, i, j] = np.sum(padded[0, :, i : i + 3, j : j + 3] * weights["conv_w"][o])
    expected = np.maximum(conv, 0).mean(axis=(1, 2))[:3]
    np.testing.assert_allclose(model.forward(x)[0], expected, rtol=1e-4, atol=1e-5)


def test_model_reports_cpu_provider_and_spatial_layers(tmp_path: Path) -> None:
    model = LoadedModel("m", write_model_folder(tmp_path / "m"), CPU)
    assert model.session.provider == "CPUExecutionProvider"
    assert [(layer.name, layer.op_type) for layer in model.layers] == [
        ("conv", "Conv"),
        ("relu", "Relu"),
    ]
    assert model.layers[0].shape[1:] == (4, 16, 16)
    assert model.default_layer == "relu"


def test_targets_resolve_by_index_or_label(tmp_path: Path) -> None:
    model = LoadedModel("m", write_model_folder(tmp_path / "m"), CPU)
    assert model.resolve_target(1) == 1
    assert model.resolve_target("Blue") == 2
    with pytest.raises(InvalidParameters):
        model.resolve_target(3)
    with pytest.raises(InvalidParameters):
        model.resolve_target("purple")


def test_repository_serves_the_good_model_beside_a_broken_one(tiny_repository_dir: Path) -> None:
    repository = ModelRepository(tiny_repository_dir, CPU)
    assert not repository.ready
    repository.load_all()
    states = {e.name: e.state for e in repository.entries()}
    assert states == {"broken": ModelState.FAILED, "tiny": ModelState.LOADED}
    assert repository.ready
    assert "not a valid ONNX file" in (repository.entry("broken").reason or "")
    assert repository.get("tiny").num_classes == 3
    with pytest.raises(ModelNotReady):
        repository.get("broken")
    with pytest.raises(ModelNotFound):
        repository.get("bad name!")
    with pytest.raises(ModelNotFound):
        repository.get("../tiny")


def test_missing_config_fails_that_model_only(tmp_path: Path) -> None:
    write_model_folder(tmp_path / "good")
    (write_model_folder(tmp_path / "noconfig") / "config.json").unlink()
    repository = ModelRepository(tmp_path, CPU)
    repository.load_all()
    entry = repository.entry("noconfig")
    assert entry.state is ModelState.FAILED
    assert "config.json" in (entry.reason or "")
    assert repository.entry("good").state is ModelState.LOADED
