"""The Python client against the app served by uvicorn as a real process."""

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx2
import numpy as np
import pytest
from onnx_explain_client import ClientError, ConnectionFailed, ExplainClient, ServiceError

from tests.images import encode, photo
from tests.servers import free_port, start_service

MODEL = "efficientnet-lite0"
CAT_CLASSES = range(281, 286)
CHELSEA_SHAPE = (300, 451)


@dataclass(frozen=True)
class Served:
    url: str
    cache_dir: Path


@contextmanager
def served_app(repository: Path, workdir: Path) -> Iterator[Served]:
    """`onnx-explain serve` over `repository` on a free port, on the CPU, until the block ends."""
    port = free_port()
    cache_dir = workdir / "cache"
    log = workdir / "server.log"
    process = start_service(repository, port, log, CACHE_DIR=str(cache_dir))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield Served(url, cache_dir)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    with ExplainClient(url, timeout=1) as service:
        while True:
            assert process.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if service.readiness().status == "ok":
                    return
            except ConnectionFailed:
                pass
            assert time.monotonic() < deadline, f"server did not become ready:\n{log.read_text()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def served(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served_app(default_model_dir, tmp_path_factory.mktemp("served")) as app:
        yield app


@pytest.fixture
def service(served: Served) -> Iterator[ExplainClient]:
    with ExplainClient(served.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return photo("chelsea")


def test_models_and_model_info(service: ExplainClient) -> None:
    summaries = {m.name: m for m in service.models()}
    assert summaries[MODEL].ready
    info = service.model(MODEL)
    assert info.labels_count == 1000
    assert info.default_layer in {layer.name for layer in info.layers}


def test_predict_names_the_cat_from_an_array_a_path_and_bytes(
    service: ExplainClient, chelsea: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "chelsea.png"
    path.write_bytes(encode(chelsea))
    answers = [
        service.predict(image, MODEL, top_k=3) for image in (chelsea, path, path.read_bytes())
    ]
    assert answers[0].model == MODEL
    assert answers[0].predictions[0].index in CAT_CLASSES
    assert len(answers[0].predictions) == 3
    assert all(a.predictions == answers[0].predictions for a in answers)


def test_explain_gradcam_as_array_and_overlay(service: ExplainClient, chelsea: np.ndarray) -> None:
    result = service.explain(chelsea, MODEL, "gradcam", formats=["array", "overlay"])
    assert result.method == "gradcam"
    assert result.predictions[0].index in CAT_CLASSES
    (explanation,) = result.explanations
    assert explanation.target == result.predictions[0].index
    array = explanation.get("array")
    assert array.values is not None
    assert array.values.shape == CHELSEA_SHAPE
    assert array.values.dtype == np.float32
    assert 0.0 <= array.values.min() < array.values.max() <= 1.0
    assert explanation.array is array.values
    overlay = explanation.get("overlay")
    assert overlay.png is not None
    assert overlay.values is None
    assert explanation.png == overlay.png
    decoded = cv2.imdecode(np.frombuffer(overlay.png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    assert decoded.shape == (*CHELSEA_SHAPE, 3)
    assert overlay.image().shape == (*CHELSEA_SHAPE, 3)


def test_gray_pngs_decode_to_the_normalised_map(
    service: ExplainClient, chelsea: np.ndarray
) -> None:
    result = service.explain(
        chelsea,
        MODEL,
        "gradcam",
        targets=["tabby cat", 285],
        output={"size": "model"},
        formats=["json", "png16", "png"],
    )
    assert [e.target for e in result.explanations] == [281, 285]
    for explanation in result.explanations:
        exact, png16, png = (explanation.get(f).values for f in ("json", "png16", "png"))
        assert exact is not None
        assert png16 is not None
        assert png is not None
        assert exact.shape == png16.shape == png.shape == (224, 224)
        np.testing.assert_allclose(png16, exact, atol=1 / 65535)
        np.testing.assert_allclose(png, exact, atol=1 / 255)
        assert explanation.array is exact


def test_streamed_occlusion_reports_progress_and_scores(
    service: ExplainClient, chelsea: np.ndarray
) -> None:
    seen: list[tuple[int, int, str | None]] = []
    result = service.explain(
        chelsea,
        MODEL,
        "occlusion",
        params={"window": 56, "stride": 28},
        metrics=["deletion", "insertion"],
        metric_steps=4,
        curves=True,
        on_progress=lambda done, total, stage: seen.append((done, total, stage)),
    )
    stages = [stage for _, _, stage in seen]
    order = ["occlusion", "deletion", "insertion"]
    assert stages == sorted(stages, key=lambda stage: order.index(str(stage)))
    assert set(stages) == {"occlusion", "deletion", "insertion"}
    assert (49, 49, "occlusion") in seen
    (explanation,) = result.explanations
    assert explanation.metrics is not None
    assert explanation.metrics.deletion_curve is not None
    assert len(explanation.metrics.deletion_curve) == 5
    assert explanation.metrics.deletion_auc is not None
    plain = service.explain(chelsea, MODEL, "occlusion", params={"window": 56, "stride": 28})
    assert plain.explanations[0].metrics is None
    np.testing.assert_array_equal(plain.explanations[0].array, explanation.array)


def test_an_error_in_a_stream_is_a_service_error(
    service: ExplainClient, chelsea: np.ndarray
) -> None:
    with pytest.raises(ServiceError) as caught:
        service.explain(
            chelsea,
            MODEL,
            "occlusion",
            params={"window": 8, "stride": 1, "max_passes": 10},
            on_progress=lambda *_: None,
        )
    assert caught.value.code == "too_much_work"


def test_an_unknown_model_is_a_service_error(service: ExplainClient, chelsea: np.ndarray) -> None:
    with pytest.raises(ServiceError) as caught:
        service.explain(chelsea, "resnet-9000", "gradcam")
    assert caught.value.status == 404
    assert caught.value.code == "model_not_found"
    assert "resnet-9000" in caught.value.message
    with pytest.raises(ServiceError, match="model_not_found"):
        service.model("resnet-9000")


def test_bad_params_are_a_422(service: ExplainClient, chelsea: np.ndarray) -> None:
    with pytest.raises(ServiceError) as caught:
        service.explain(chelsea, MODEL, "occlusion", params={"window": 0})
    assert caught.value.status == 422
    assert "window" in caught.value.message
    with pytest.raises(ServiceError) as unknown:
        service.explain(chelsea, MODEL, "gradcam", params={"colour": "red"})
    assert unknown.value.status == 422


def test_a_closed_port_is_a_client_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with ExplainClient(url, timeout=2) as service, pytest.raises(ClientError) as caught:
        service.models()
    assert not isinstance(caught.value, ServiceError)
    assert url in caught.value.message


def test_the_api_key_is_sent_and_foreign_errors_are_service_errors() -> None:
    seen: list[httpx2.Request] = []

    def gateway(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(502, text="<html>Bad Gateway</html>")

    transport = httpx2.MockTransport(gateway)
    with (
        ExplainClient("http://service", api_key="s3cret", transport=transport) as service,
        pytest.raises(ServiceError) as caught,
    ):
        service.models()
    assert seen[0].headers["X-API-Key"] == "s3cret"
    assert (caught.value.status, caught.value.code) == (502, "http_error")
    assert "Bad Gateway" in caught.value.message


def test_bad_images_and_urls_are_client_errors(tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="must start with http"):
        ExplainClient("127.0.0.1:8000")
    with ExplainClient("http://127.0.0.1:1") as service:
        with pytest.raises(ClientError, match="RGB uint8"):
            service.predict(np.zeros((8, 8, 3), dtype=np.float32), MODEL)
        with pytest.raises(ClientError, match="cannot read image"):
            service.predict(tmp_path / "missing.png", MODEL)
