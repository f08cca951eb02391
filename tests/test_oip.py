"""The Open Inference Protocol, spoken by Triton's own HTTP client to the service as a process."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from engines.imaging.decode import ImageLimits, decode_image, preprocess
from engines.models.loaded import read_config
from tests.images import encode, solid
from tests.servers import serving


@pytest.fixture(scope="module")
def service(tiny_repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tiny_repository_dir, tmp_path_factory.mktemp("oip") / "server.log") as base:
        yield base.removeprefix("http://")  # tritonclient takes host:port


@pytest.fixture
def client(service: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=service) as found:
        yield found


def _reference(tiny_repository_dir: Path, batch: np.ndarray) -> np.ndarray:
    """model.onnx itself, run by onnxruntime."""
    session = ort.InferenceSession(
        str(tiny_repository_dir / "tiny" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(None, {"x": batch})
    return np.asarray(logits)


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready("tiny")
    assert not client.is_model_ready("broken")
    metadata = client.get_model_metadata("tiny")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("no-such-model")
    assert missing.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnxruntime_on_model_onnx(
    client: triton.InferenceServerClient, tiny_repository_dir: Path, binary: bool
) -> None:
    batch = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    tensor = triton.InferInput("x", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    wanted = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("tiny", [tensor], outputs=[wanted])
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits, _reference(tiny_repository_dir, batch), rtol=1e-5, atol=1e-6)


def test_a_bytes_input_of_encoded_images_is_preprocessed_as_for_predict(
    client: triton.InferenceServerClient, tiny_repository_dir: Path
) -> None:
    images = [encode(solid((220, 10, 10), 20, 30)), encode(solid((10, 10, 220), 40, 24))]
    tensor = triton.InferInput("x", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    logits = client.infer("tiny", [tensor]).as_numpy("logits")  # binary out: tritonclient's default
    assert logits.argmax(axis=1).tolist() == [0, 2]  # red, blue
    spec = read_config(tiny_repository_dir / "tiny").input
    decoded = [decode_image(data, ImageLimits()) for data in images]
    expected = _reference(tiny_repository_dir, preprocess(decoded, spec))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_get_the_protocols_errors_and_the_service_keeps_serving(
    client: triton.InferenceServerClient,
) -> None:
    zeros = np.zeros((1, 3, 16, 16), np.float32)
    cases: list[tuple[str, np.ndarray, str, str]] = [
        ("x", np.zeros((1, 3, 8, 8), np.float32), "FP32", "400"),  # not the model's size
        ("y", zeros, "FP32", "400"),  # not the model's input
        ("x", zeros.astype(np.int64), "INT64", "400"),
        ("x", np.array([b"not an image"], np.object_), "BYTES", "415"),
    ]
    for name, values, datatype, status in cases:
        tensor = triton.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tiny", [tensor])
        assert refused.value.status() == status, refused.value.message()
        assert refused.value.message()
    good = triton.InferInput("x", list(zeros.shape), "FP32")
    good.set_data_from_numpy(zeros)
    with pytest.raises(InferenceServerException) as not_ready:
        client.infer("broken", [good])
    assert not_ready.value.status() == "503"
    assert client.infer("tiny", [good]).as_numpy("logits").shape == (1, 3)
