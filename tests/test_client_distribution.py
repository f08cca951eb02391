"""The client is a distribution of its own: installed alone in a fresh venv, it pulls none of
the service's heavy dependencies and answers against a running service."""

import json
import subprocess
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest

from tests.images import encode
from tests.servers import serving

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = {"onnxruntime", "onnxruntime-gpu", "opencv-python", "opencv-python-headless"}
SERVER_ONLY |= {"onnx", "fastapi", "starlette", "uvicorn"}

SCRIPT = """
import json
import sys

from onnx_explain_client import ExplainClient

with ExplainClient(sys.argv[1]) as service:
    ready = service.readiness().status
    models = [m.name for m in service.models()]
    top = service.predict(sys.argv[2], "tiny", top_k=1).predictions[0]
    result = service.explain(
        sys.argv[2], "tiny", "gradcam", targets=[0], formats=["array", "png", "overlay"]
    )
    explanation = result.explanations[0]
    png = explanation.get("png")
try:
    import client  # noqa: F401
    top_level_client = True
except ImportError:
    top_level_client = False
print(json.dumps({
    "ready": ready,
    "models": models,
    "top": top.label,
    "array": list(explanation.array.shape),
    "block": float(explanation.array[:16, :20].mean()),
    "rest": float(explanation.array[16:, 20:].mean()),
    "png": list(png.values.shape),
    "png_peak": float(png.values.max()),
    "overlay": list(explanation.get("overlay").image().shape),
    "top_level_client": top_level_client,
}))
"""


def _version(pyproject: Path) -> str:
    version: str = tomllib.loads(pyproject.read_text())["project"]["version"]
    return version


def test_the_client_and_the_service_move_versions_together() -> None:
    assert _version(ROOT / "client" / "pyproject.toml") == _version(ROOT / "pyproject.toml")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only `pip install ./client` (from the package registry)."""
    folder = tmp_path_factory.mktemp("client-venv")
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT / "client")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python


def test_installing_the_client_alone_pulls_nothing_of_the_service(client_venv: Path) -> None:
    listed = subprocess.run(
        [str(client_venv), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "onnx-explain-client" in names
    assert names & SERVER_ONLY == set()
    assert "onnx-explain" not in names


def test_the_client_alone_answers_against_a_running_service(
    client_venv: Path, tiny_repository_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "red.png"
    pixels = np.zeros((32, 40, 3), np.uint8)
    pixels[:16, :20] = (255, 0, 0)  # a red block in the top-left quarter
    image.write_bytes(encode(pixels))
    script = tmp_path / "use_client.py"
    script.write_text(SCRIPT)
    with serving(tiny_repository_dir, tmp_path / "server.log") as base:
        ran = subprocess.run(
            [str(client_venv), str(script), base, str(image)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # not the repository: nothing of it on the path
        )
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout)
    assert answer["ready"] == "ok"
    assert "tiny" in answer["models"]
    assert answer["top"] == "red"
    assert answer["array"] == answer["png"] == [32, 40]  # the upload's size, decoded by pypng
    assert answer["overlay"] == [32, 40, 3]
    assert answer["block"] > 0.5 > answer["rest"]  # the red class's map is on the block
    assert answer["png_peak"] == 1.0
    assert answer["top_level_client"] is False
