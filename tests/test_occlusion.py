"""Occlusion on a model whose answer is known exactly, and on the real default model."""

import base64
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.errors import DeadlineExceeded, InvalidParameters, TooMuchWork
from engines.imaging.decode import preprocess
from engines.methods.occlusion import ACTIVATION_FACTOR, Occlusion, job_slot, window_starts
from engines.methods.pipeline import TargetMap, WorkLimits
from engines.models.loaded import LoadedModel
from engines.runtime.deadline import Deadline
from schemas.params import OcclusionParams
from tests.conftest import CPU
from tests.images import encode, photo, solid
from tests.test_explain import CAT_BOX, peak
from tests.tiny_models import REGION, write_model_folder


@pytest.fixture(scope="module")
def region_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = write_model_folder(
        tmp_path_factory.mktemp("occlusion") / "region",
        "region_mean",
        scale=1 / 255,
        labels=("region", "nothing"),
    )
    return LoadedModel("region", folder, CPU)


def occlude(
    model: LoadedModel, image: np.ndarray, limits: WorkLimits, **params: object
) -> list[TargetMap]:
    tensor = preprocess([image], model.config.input)
    parsed = OcclusionParams.model_validate(params)
    return Occlusion().explain(model, tensor, [0], 1, parsed, limits).maps


def region_indicator() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[REGION] = 1.0
    return mask


@pytest.mark.parametrize("budget_copies", [1, 7, 64, 1000])
def test_one_pixel_patches_recover_the_region_for_every_batch_size(
    region_model: LoadedModel, budget_copies: int
) -> None:
    copy_bytes = 3 * 16 * 16 * 4 * ACTIVATION_FACTOR
    limits = WorkLimits(memory_budget_bytes=budget_copies * copy_bytes)
    (result,) = occlude(
        region_model,
        solid((255, 255, 255), 16, 16),
        limits,
        window=1,
        stride=1,
        baseline="constant",
        value=0,
        score="logit",
    )
    area = region_indicator().sum()
    # Blacking out one white pixel of the region lowers its mean by 1/area, elsewhere by 0.
    np.testing.assert_allclose(result.heatmap, region_indicator() / area, atol=1e-6)


def test_overlapping_windows_are_averaged(region_model: LoadedModel) -> None:
    (result,) = occlude(
        region_model,
        solid((255, 255, 255), 16, 16),
        WorkLimits(),
        window=2,
        stride=1,
        value=0,
        score="logit",
    )
    area = region_indicator().sum()
    windows = [(t, left) for t in range(15) for left in range(15)]
    expected = np.zeros((16, 16))
    count = np.zeros((16, 16))
    for top, left in windows:
        patch = np.zeros((16, 16))
        patch[top : top + 2, left : left + 2] = 1
        expected += patch * (patch * region_indicator()).sum() / area
        count += patch
    np.testing.assert_allclose(result.heatmap, expected / count, atol=1e-6)


def test_windows_cover_the_edges() -> None:
    assert window_starts(16, 5, 4).tolist() == [0, 4, 8, 11]
    assert window_starts(224, 16, 8).size == 27


def test_probability_score_drops_where_the_class_lives(region_model: LoadedModel) -> None:
    (result,) = occlude(
        region_model, solid((255, 255, 255), 16, 16), WorkLimits(), window=4, stride=2, value=0
    )
    assert result.heatmap[REGION].mean() > 0
    assert result.heatmap[12:, 12:].max() == 0


def test_limits_and_bad_windows(region_model: LoadedModel) -> None:
    image = solid((255, 255, 255), 16, 16)
    with pytest.raises(TooMuchWork, match="256 passes"):
        occlude(region_model, image, WorkLimits(max_passes=100), window=1, stride=1)
    with pytest.raises(TooMuchWork, match="the limit is 10"):
        occlude(region_model, image, WorkLimits(), window=1, stride=1, max_passes=10)
    with pytest.raises(InvalidParameters, match="larger than the model input"):
        occlude(region_model, image, WorkLimits(), window=17)
    with pytest.raises(ValueError, match="stride"):
        OcclusionParams.model_validate({"stride": 0})


def test_feature_dip_peaks_where_the_strongest_channel_lives(tmp_path: Path) -> None:
    model = LoadedModel("cnn", write_model_folder(tmp_path / "cnn"), CPU)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[2:7, 9:14] = (200, 0, 0)
    (result,) = occlude(
        model, image, WorkLimits(), window=3, stride=1, value=0, score="feature_dip", layer="relu"
    )
    row, column = peak(result.heatmap)
    assert 2 <= row < 7
    assert 9 <= column < 14


def test_occlusion_over_http_reports_passes_in_the_error(tiny_client: TestClient) -> None:
    image = base64.b64encode(encode(solid((200, 0, 0), 16, 16))).decode()
    response = tiny_client.post(
        "/v1/models/tiny/explain",
        json={
            "image": image,
            "method": "occlusion",
            "params": {"window": 1, "stride": 1, "max_passes": 5},
        },
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "too_much_work"
    assert "256 passes" in response.json()["error"]["message"]
    ok = tiny_client.post(
        "/v1/models/tiny/explain",
        json={"image": image, "method": "occlusion", "params": {"window": 4, "stride": 4}},
    )
    assert ok.status_code == 200, ok.text


def test_occlusion_for_the_cat_peaks_on_the_cat(client: TestClient) -> None:
    response = client.post(
        "/v1/models/efficientnet-lite0/explain",
        json={
            "image": base64.b64encode(encode(photo("chelsea"))).decode(),
            "method": "occlusion",
            "targets": [281],
            "params": {"window": 48, "stride": 16},
            "output": {"format": "array"},
        },
    )
    assert response.status_code == 200, response.text
    heatmap = response.json()["explanations"][0]["heatmap"]
    values = np.frombuffer(base64.b64decode(heatmap["data"]), "<f4").reshape(heatmap["shape"])
    row, column = peak(values)
    assert CAT_BOX[0].start <= row < CAT_BOX[0].stop
    assert CAT_BOX[1].start <= column < CAT_BOX[1].stop


@pytest.mark.parametrize(
    "params",
    [
        {"window": 3, "stride": 2, "score": "logit"},
        {"window": 4, "stride": 3, "score": "probability", "baseline": "mean"},
        {"window": 3, "stride": 1, "score": "feature_dip", "layer": "relu", "value": 0},
    ],
)
def test_copies_made_in_the_graph_match_copies_made_in_numpy(
    tmp_path: Path, params: dict[str, object]
) -> None:
    """The CUDA path (in-graph copies, IO binding) run on the CPU provider."""
    model = LoadedModel("cnn", write_model_folder(tmp_path / "cnn"), CPU)
    image = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    tensor = preprocess([image], model.config.input)
    parsed = OcclusionParams.model_validate(params)
    limits = WorkLimits(memory_budget_bytes=5 * 3 * 16 * 16 * 4 * ACTIVATION_FACTOR)
    on_host = Occlusion(copies_on_device=False).explain(model, tensor, [0, 2], 1, parsed, limits)
    on_device = Occlusion(copies_on_device=True).explain(model, tensor, [0, 2], 1, parsed, limits)
    for host_map, device_map in zip(on_host.maps, on_device.maps, strict=True):
        assert host_map.target == device_map.target
        np.testing.assert_allclose(device_map.heatmap, host_map.heatmap, rtol=1e-5, atol=1e-6)


def test_occlusion_jobs_wait_for_a_slot_within_their_deadline(region_model: LoadedModel) -> None:
    """With every slot taken, a job waits; past its deadline it gives up, else it runs."""
    limits = WorkLimits(concurrent_jobs=1)
    image = solid((255, 255, 255), 16, 16)
    params = {"window": 4, "stride": 4, "score": "logit"}
    done = threading.Event()
    finished: list[list[TargetMap]] = []

    with job_slot(1):
        with Deadline(0.05).activate(), pytest.raises(DeadlineExceeded):
            occlude(region_model, image, limits, **params)

        def waiting_job() -> None:
            finished.append(occlude(region_model, image, limits, **params))
            done.set()

        worker = threading.Thread(target=waiting_job)
        worker.start()
        assert not done.wait(0.2)  # blocked on the slot this test holds
    assert done.wait(10)
    worker.join()
    expected = occlude(region_model, image, WorkLimits(concurrent_jobs=3), **params)
    np.testing.assert_array_equal(finished[0][0].heatmap, expected[0].heatmap)


def test_a_confident_class_s_probability_drops_are_resolved(tmp_path: Path) -> None:
    # A white image gives the region's class a logit of 30: p = 1 - 9e-14, which float32 holds
    # as 1, so its drops would all read 0. Each 2x2 window covering c pixels of the 30-pixel
    # region lowers the logit to 30 - c.
    folder = write_model_folder(
        tmp_path / "confident", "region_mean", scale=30 / 255, labels=("region", "nothing")
    )
    model = LoadedModel("confident", folder, CPU)
    (result,) = occlude(
        model, solid((255, 255, 255), 16, 16), WorkLimits(), window=2, stride=2, value=0
    )
    covered = np.zeros((16, 16))
    for top in range(0, 16, 2):
        for left in range(0, 16, 2):
            count = region_indicator()[top : top + 2, left : left + 2].sum()
            covered[top : top + 2, left : left + 2] = count

    def sigmoid(logit: np.ndarray) -> np.ndarray:
        result: np.ndarray = 1 / (1 + np.exp(-logit))
        return result

    expected = sigmoid(np.array(30.0)) - sigmoid(30 - covered)
    assert expected.max() > 0
    np.testing.assert_allclose(result.heatmap, expected, rtol=1e-4, atol=1e-20)
