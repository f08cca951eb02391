"""The console script, and the app served by uvicorn as a real process."""

import base64
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from service.cli import main
from tests.images import encode, solid
from tests.servers import free_port, wait_until_ready


def test_models_list_names_the_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    assert "efficientnet-lite0" in capsys.readouterr().out.split()


def test_building_an_unknown_model_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "build", "resnet-9000", "--repository", str(tmp_path)]) == 2
    assert "resnet-9000" in capsys.readouterr().err


def test_serve_answers_over_a_real_socket(tiny_repository_dir: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "ONNX_EXPLAIN_MODEL_REPOSITORY": str(tiny_repository_dir),
        "ONNX_EXPLAIN_PROVIDERS": "cpu",
        "ONNX_EXPLAIN_INTRA_OP_THREADS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process)
        image = base64.b64encode(encode(solid((250, 5, 5)))).decode()
        response = httpx2.post(f"{base}/v1/models/tiny/predict", json={"image": image}, timeout=10)
        assert response.status_code == 200
        assert response.json()["predictions"][0]["label"] == "red"
        assert httpx2.get(f"{base}/v1/models/nope", timeout=5).status_code == 404
    finally:
        process.terminate()
        process.wait(timeout=10)
