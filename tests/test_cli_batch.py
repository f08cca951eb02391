"""`onnx-explain batch`: a map and a manifest line per image, resumable, in-process and on Ray."""

import base64
import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.batch.job import map_stem
from engines.batch.manifest import read_manifest
from service.cli import main
from tests.images import encode, photo, solid
from tests.test_client import CAT_CLASSES, CHELSEA_SHAPE, MODEL

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
CLASS_OF = {"red": 0, "green": 1, "blue": 2}
IMAGE_SHAPE = (24, 40)


def half_coloured(rgb: tuple[int, int, int]) -> np.ndarray:
    """The colour on the left half, dark grey on the right: a map with something to show."""
    image = solid((30, 30, 30), *IMAGE_SHAPE)
    image[:, : IMAGE_SHAPE[1] // 2] = rgb
    return image


@pytest.fixture
def batch_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `Settings()` reads in the CLI: a cache of our own, CPU."""
    monkeypatch.setenv("ONNX_EXPLAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNX_EXPLAIN_PROVIDERS", "cpu")
    monkeypatch.setenv("ONNX_EXPLAIN_INTRA_OP_THREADS", "1")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """red.png, green.jpg, nested/blue.png, and broken.png (a PNG signature and nothing else)."""
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    (folder / "red.png").write_bytes(encode(half_coloured(COLOURS["red"])))
    (folder / "green.jpg").write_bytes(encode(half_coloured(COLOURS["green"]), ".jpg"))
    (folder / "nested" / "blue.png").write_bytes(encode(half_coloured(COLOURS["blue"])))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "notes.txt").write_text("not an image")
    return folder


def batch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["batch", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def by_image(output: Path) -> dict[str, dict[str, Any]]:
    lines = read_manifest(output / "manifest.jsonl")
    found = {line["image"]: line for line in lines}
    assert len(found) == len(lines), "an image has two lines"
    return found


def read_png(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert pixels is not None, f"{path} is not a PNG"
    return pixels


def explained_alone(
    capsys: pytest.CaptureFixture[str], image: Path, model: str, repository: Path, out: Path
) -> np.ndarray:
    """The map `onnx-explain explain --local` writes for one image, as an array."""
    status = main(
        ["explain", str(image), "--model", model, "--local", "--repository", str(repository),
         "--out", str(out / "alone.png"), "--array-out", str(out / "alone.npy")]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    capsys.readouterr()
    values: np.ndarray = np.load(out / "alone.npy")
    return values


def test_a_folder_gets_a_map_and_a_line_per_image_and_a_rerun_resumes(
    capsys: pytest.CaptureFixture[str],
    batch_settings: None,
    tiny_repository_dir: Path,
    image_folder: Path,
    tmp_path: Path,
) -> None:
    output = image_folder / "maps"  # inside the input: its PNGs are no input images
    job = ["tiny", str(image_folder), "--repository", str(tiny_repository_dir), "--output",
           str(output), "--format", "png", "--format", "array", "--progress"]  # fmt: skip
    status, out, err = batch(capsys, *job)
    assert status == 0, err
    assert "3 explained, 1 failed, 0 already done, of 4 images" in out
    assert "gradcam [" in err
    assert err.endswith("4/4 images\n")
    lines = by_image(output)
    assert set(lines) == {"broken.png", "green.jpg", "nested/blue.png", "red.png"}
    assert lines["broken.png"]["error"]["code"] == "invalid_image"
    for key, colour in [("red.png", "red"), ("green.jpg", "green"), ("nested/blue.png", "blue")]:
        line = lines[key]
        assert line["prediction"]["index"] == line["target"] == CLASS_OF[colour]
        assert line["prediction"]["label"] == colour
        assert 0.0 < line["prediction"]["score"] <= 1.0
        assert line["metrics"] == {}
        assert set(line["files"]) == {"png", "array"}
        assert read_png(output / line["files"]["png"]).shape == IMAGE_SHAPE
        values = np.load(output / line["files"]["array"])
        assert values.shape == IMAGE_SHAPE
        assert values.dtype == np.float32
        assert values.max() == pytest.approx(1.0)
    # The map of each image is the one `explain --local` makes for it alone.
    alone = explained_alone(capsys, image_folder / "red.png", "tiny", tiny_repository_dir, tmp_path)
    np.testing.assert_allclose(
        np.load(output / lines["red.png"]["files"]["array"]), alone, atol=1e-5
    )

    # A second run finds everything done and touches nothing.
    manifest = output / "manifest.jsonl"
    before = manifest.read_bytes()
    status, out, err = batch(capsys, *job)
    assert status == 0, err
    assert "0 explained, 0 failed, 4 already done, of 4 images" in out
    assert manifest.read_bytes() == before

    # Green's line deleted (its files too), and blue's cut short as by a kill mid-write:
    # both are redone, and the manifest is whole again.
    kept = [line for line in before.decode().splitlines() if '"image": "green.jpg"' not in line]
    blue = next(line for line in kept if '"image": "nested/blue.png"' in line)
    kept.remove(blue)
    manifest.write_text("\n".join(kept) + "\n" + blue[: len(blue) // 2])
    for path in lines["green.jpg"]["files"].values():
        (output / path).unlink()
    status, out, err = batch(capsys, *job)
    assert status == 0, err
    assert "2 explained, 0 failed, 2 already done, of 4 images" in out
    assert by_image(output) == lines
    assert (output / lines["green.jpg"]["files"]["png"]).is_file()


def test_a_text_list_csv_and_parquet_name_their_images_as_written(
    capsys: pytest.CaptureFixture[str],
    batch_settings: None,
    tiny_repository_dir: Path,
    image_folder: Path,
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    red = str(image_folder / "red.png")
    listing = image_folder / "list.txt"
    listing.write_text(f"# the images\n{red}\n\nnested/blue.png\nmissing.png\n{red}\n")
    table = image_folder / "table.csv"
    with table.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["label", "path"])
        writer.writerows([["r", "red.png"], ["g", "green.jpg"]])
    parquet = image_folder / "table.parquet"
    pq.write_table(pa.table({"file": ["nested/blue.png", red]}), parquet)
    model = str(tiny_repository_dir / "tiny")  # a model folder rather than a name
    cases: list[tuple[Path, list[str], dict[str, int | None]]] = [
        (listing, [], {red: 0, "nested/blue.png": 2, "missing.png": None}),
        (table, ["--column", "path"], {"red.png": 0, "green.jpg": 1}),
        (parquet, ["--column", "file"], {"nested/blue.png": 2, red: 0}),
    ]
    for source, options, expected in cases:
        output = tmp_path / source.name
        status, _, err = batch(capsys, model, str(source), "--output", str(output), *options)
        assert status == 0, err
        lines = by_image(output)
        assert list(lines) == list(expected)  # in the input's order, each image once
        for key, target in expected.items():
            if target is None:
                assert lines[key]["error"]["code"] == "unreadable_image"
            else:
                assert lines[key]["target"] == target
                png = lines[key]["files"]["png"]
                assert png == f"maps/{map_stem(key)}.png"
                assert read_png(output / png).shape == IMAGE_SHAPE

    status, _, err = batch(capsys, model, str(table), "--output", str(tmp_path / "bad"))
    assert status == 2
    assert err == f"error: {table} has no column 'image' (columns: label, path)\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "occlusion", "--params", '{"window": 0}'], "params.window"),
        (["--params", "[1]"], "--params must be a JSON object"),
        (["--target", "purple"], "no class is labelled 'purple'"),
        (["--format", "png", "--normalize", "none"], "output."),
        (["--metrics", "deletion,accuracy"], "--metrics: unknown accuracy"),
    ],
)
def test_bad_options_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str],
    batch_settings: None,
    tiny_repository_dir: Path,
    image_folder: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    output = tmp_path / "maps"
    repository = ["--repository", str(tiny_repository_dir)]
    status, _, err = batch(
        capsys, "tiny", str(image_folder), *repository, "--output", str(output), *args
    )
    assert status == 2
    assert err.startswith("error: ")
    assert message in err
    assert not (output / "manifest.jsonl").exists()


def test_a_folder_of_another_jobs_maps_is_refused(
    capsys: pytest.CaptureFixture[str],
    batch_settings: None,
    tiny_repository_dir: Path,
    image_folder: Path,
    tmp_path: Path,
) -> None:
    output = str(tmp_path / "maps")
    job = ["tiny", str(image_folder), "--repository", str(tiny_repository_dir), "--output", output]
    assert batch(capsys, *job)[0] == 0
    status, _, err = batch(capsys, *job, "--method", "saliency")
    assert status == 2
    assert "holds the maps of another job (it differs in method, params)" in err


def test_the_default_model_explains_photos_and_scores_them_as_the_service_does(
    capsys: pytest.CaptureFixture[str],
    batch_settings: None,
    default_model_dir: Path,
    client: TestClient,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        (folder / f"{name}.png").write_bytes(encode(photo(name)))
    output = tmp_path / "maps"
    status, _, err = batch(
        capsys, MODEL, str(folder), "--repository", str(default_model_dir), "--output",
        str(output), "--format", "overlay", "--format", "array", "--metrics",
        "insertion,deletion", "--metric-steps", "4",
    )  # fmt: skip
    assert status == 0, err
    lines = by_image(output)
    assert lines["chelsea.png"]["prediction"]["index"] in CAT_CLASSES
    assert read_png(output / lines["chelsea.png"]["files"]["overlay"]).shape == (*CHELSEA_SHAPE, 3)
    for name in ("chelsea", "coffee"):
        line = lines[f"{name}.png"]
        alone = explained_alone(capsys, folder / f"{name}.png", MODEL, default_model_dir, tmp_path)
        np.testing.assert_allclose(np.load(output / line["files"]["array"]), alone, atol=1e-5)
        body = {
            "image": base64.b64encode((folder / f"{name}.png").read_bytes()).decode(),
            "method": "gradcam",
            "metrics": ["deletion", "insertion"],
            "metric_steps": 4,
            "output": {"format": "array"},
        }
        response = client.post(f"/v1/models/{MODEL}/explain", json=body)
        assert response.status_code == 200, response.text
        (explanation,) = response.json()["explanations"]
        assert explanation["target"] == line["target"]
        served = explanation["metrics"]
        assert list(line["metrics"]) == ["deletion_auc", "insertion_auc"]
        for key in ("deletion_auc", "insertion_auc"):
            assert 0.0 <= line["metrics"][key] <= 1.0
            assert line["metrics"][key] == pytest.approx(served[key], abs=1e-5)


def test_ray_writes_the_maps_and_manifest_of_the_local_run(
    capsys: pytest.CaptureFixture[str],
    batch_settings: None,
    tiny_repository_dir: Path,
    image_folder: Path,
    tmp_path: Path,
) -> None:
    pytest.importorskip("ray.data")
    job = ["tiny", str(image_folder), "--repository", str(tiny_repository_dir), "--format",
           "colormap", "--format", "array", "--method", "saliency", "--metrics",
           "deletion,insertion"]  # fmt: skip
    status, _, err = batch(capsys, *job, "--output", str(tmp_path / "local"))
    assert status == 0, err
    status, out, err = batch(
        capsys, *job, "--output", str(tmp_path / "ray"), "--ray", "local", "--ray-actors", "1",
        "--ray-batch-size", "2",
    )  # fmt: skip
    assert status == 0, err
    assert "3 explained, 1 failed, 0 already done, of 4 images" in out
    local, on_ray = by_image(tmp_path / "local"), by_image(tmp_path / "ray")
    assert set(on_ray) == set(local)
    for key, line in local.items():
        other = on_ray[key]
        if "error" in line:
            assert other == line
            continue
        assert other["prediction"]["score"] == pytest.approx(line["prediction"]["score"], abs=1e-6)
        assert set(line["metrics"]) == {"deletion_auc", "insertion_auc"}
        assert other["metrics"] == pytest.approx(line["metrics"], abs=1e-6)
        floats = {"prediction": None, "metrics": None}
        assert {**other, **floats} == {**line, **floats}
        np.testing.assert_allclose(
            np.load(tmp_path / "ray" / other["files"]["array"]),
            np.load(tmp_path / "local" / line["files"]["array"]),
            atol=1e-5,
        )
        ray_png = read_png(tmp_path / "ray" / other["files"]["colormap"]).astype(int)
        local_png = read_png(tmp_path / "local" / line["files"]["colormap"]).astype(int)
        assert np.abs(ray_png - local_png).max() <= 1
    assert json.loads((tmp_path / "ray" / "job.json").read_text()) == json.loads(
        (tmp_path / "local" / "job.json").read_text()
    )
