"""`onnx-explain explain`: against the served app (--url) and in-process (--local)."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.imaging.decode import preprocess
from engines.methods.occlusion import Occlusion
from engines.models.loaded import LoadedModel
from engines.runtime import progress
from engines.runtime.session import RuntimeOptions
from schemas.params import OcclusionParams
from service.cli import main
from tests.images import encode, photo
from tests.servers import free_port
from tests.test_client import CAT_CLASSES, CHELSEA_SHAPE, MODEL, Served, served_app

# A 112-pixel window every 56 pixels over a 224x224 input: 3 x 3 windows.
OCCLUSION_PARAMS = ["--param", "window=112", "--param", "stride=56"]
OCCLUSION_PASSES = 9


@pytest.fixture(scope="module")
def served(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served_app(default_model_dir, tmp_path_factory.mktemp("served-cli")) as app:
        yield app


@pytest.fixture(scope="module")
def chelsea_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "chelsea.png"
    path.write_bytes(encode(photo("chelsea")))
    return path


@pytest.fixture
def local_settings(
    monkeypatch: pytest.MonkeyPatch, default_model_dir: Path, tmp_path: Path
) -> Path:
    """The settings `--local` reads; returns the model repository."""
    monkeypatch.setenv("ONNX_EXPLAIN_MODEL_REPOSITORY", str(default_model_dir))
    monkeypatch.setenv("ONNX_EXPLAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNX_EXPLAIN_PROVIDERS", "cpu")
    monkeypatch.setenv("ONNX_EXPLAIN_INTRA_OP_THREADS", "2")
    return default_model_dir


def explain(
    capsys: pytest.CaptureFixture[str], image: Path, *args: str, model: str = MODEL
) -> tuple[int, str, str]:
    status = main(["explain", str(image), "--model", model, *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_png(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert pixels is not None, f"{path} is not a PNG"
    return pixels


def test_url_and_local_write_the_same_gradcam(
    capsys: pytest.CaptureFixture[str],
    served: Served,
    local_settings: Path,
    chelsea_png: Path,
    tmp_path: Path,
) -> None:
    outputs = {}
    for where in (["--url", served.url], ["--local", "--repository", str(local_settings)]):
        name = where[0].strip("-")
        png, npy = tmp_path / f"{name}.png", tmp_path / f"{name}.npy"
        status, out, err = explain(
            capsys, chelsea_png, "--method", "gradcam", *where, "--out", str(png),
            "--array-out", str(npy),
        )  # fmt: skip
        assert status == 0, err
        assert f"wrote {png}" in out
        assert f"wrote {npy}" in out
        top = int(out.split("predictions:\n")[1].split()[0])
        assert top in CAT_CLASSES
        assert read_png(png).shape == (*CHELSEA_SHAPE, 3)
        outputs[name] = (read_png(png), np.load(npy))
    (url_png, url_map), (local_png, local_map) = outputs["url"], outputs["local"]
    assert url_map.shape == CHELSEA_SHAPE
    np.testing.assert_allclose(local_map, url_map, atol=1e-5)
    assert np.abs(local_png.astype(int) - url_png.astype(int)).max() <= 1


def test_targets_by_index_or_label_write_a_file_each(
    capsys: pytest.CaptureFixture[str], served: Served, chelsea_png: Path, tmp_path: Path
) -> None:
    status, out, err = explain(
        capsys, chelsea_png, "--url", served.url, "--target", "tabby cat", "--target", "285",
        "--format", "png", "--out", str(tmp_path / "cam.png"),
    )  # fmt: skip
    assert status == 0, err
    assert "target 281 (tabby cat)" in out
    for target in (281, 285):
        assert read_png(tmp_path / f"cam-{target}.png").shape == CHELSEA_SHAPE


@pytest.mark.parametrize("on_device", [False, True])
def test_occlusion_reports_progress_up_to_the_total(
    default_model_dir: Path, on_device: bool
) -> None:
    model = LoadedModel(MODEL, default_model_dir / MODEL, RuntimeOptions(providers="cpu"))
    tensor = preprocess([photo("chelsea")], model.config.input)
    calls: list[tuple[int, int]] = []
    occlusion = Occlusion(copies_on_device=on_device)
    with progress.reporting(lambda done, total, _: calls.append((done, total))):
        occlusion.explain(model, tensor, None, 1, OcclusionParams(window=112, stride=56))
    done = [d for d, _ in calls]
    # 9 passes: a listener gets a report after every pass (about 25 reports a job at most).
    assert done == list(range(1, OCCLUSION_PASSES + 1))
    assert {total for _, total in calls} == {OCCLUSION_PASSES}


def test_local_occlusion_draws_a_progress_bar(
    capsys: pytest.CaptureFixture[str], local_settings: Path, chelsea_png: Path, tmp_path: Path
) -> None:
    status, _, err = explain(
        capsys, chelsea_png, "--local", "--method", "occlusion", *OCCLUSION_PARAMS,
        "--progress", "--format", "colormap", "--out", str(tmp_path / "occlusion.png"),
    )  # fmt: skip
    assert status == 0, err
    assert f"occlusion [{'#' * 30}] {OCCLUSION_PASSES}/{OCCLUSION_PASSES}" in err
    assert read_png(tmp_path / "occlusion.png").shape == (*CHELSEA_SHAPE, 3)


def test_a_bad_model_name_exits_2_with_a_message(
    capsys: pytest.CaptureFixture[str], served: Served, chelsea_png: Path, tmp_path: Path
) -> None:
    out_png = str(tmp_path / "cam.png")
    status, _, err = explain(
        capsys, chelsea_png, "--url", served.url, "--out", out_png, model="resnet-9000"
    )
    assert status == 2
    assert err == "error: no model named 'resnet-9000' (model_not_found, HTTP 404)\n"
    env = {**os.environ, "ONNX_EXPLAIN_MODEL_REPOSITORY": str(tmp_path)}
    process = subprocess.run(
        [sys.executable, "-m", "service.cli", "explain", str(chelsea_png), "--model",
         "resnet-9000", "--local", "--out", out_png],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert process.returncode == 2
    assert process.stderr == f"error: no model named 'resnet-9000' in {tmp_path}\n"
    assert not Path(out_png).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "window"], "--param expects key=value"),
        (["--method", "occlusion", "--param", "window=0"], "params.window"),
        (["--target", "unicorn"], "no class is labelled 'unicorn'"),
        (["--top-k", "50"], "top_k"),
        (["--format", "png", "--normalize", "signed", "--alpha", "2"], "alpha"),
    ],
)
def test_bad_input_exits_2_locally(
    capsys: pytest.CaptureFixture[str],
    local_settings: Path,
    chelsea_png: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    status, _, err = explain(
        capsys, chelsea_png, "--local", *args, "--out", str(tmp_path / "x.png")
    )
    assert status == 2
    assert err.startswith("error: ")
    assert message in err
    assert "Traceback" not in err


def test_a_missing_image_and_a_closed_port(
    capsys: pytest.CaptureFixture[str], chelsea_png: Path, tmp_path: Path
) -> None:
    out = str(tmp_path / "x.png")
    status, _, err = explain(capsys, tmp_path / "missing.png", "--out", out)
    assert (status, err.startswith("error: cannot read")) == (2, True)
    closed = f"http://127.0.0.1:{free_port()}"
    status, _, err = explain(capsys, chelsea_png, "--url", closed, "--out", out)
    assert status == 1
    assert err.startswith(f"error: cannot reach {closed}/v1/models/{MODEL}/explain")
