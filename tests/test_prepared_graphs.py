"""Prepared gradient graphs: ahead of time into the model folder, else into the cache."""

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.graphs.prepared import GraphKey
from engines.imaging.decode import preprocess
from engines.models.loaded import LoadedModel
from service.cli import main
from tests.conftest import CPU
from tests.images import solid
from tests.tiny_models import write_model_folder

CAM = GraphKey("relu", wrt_input=False, guided=False, top_k_seeds=False)
# One seed for one image: the run uses the paired variant of the graph.
CAM_USED = GraphKey("relu", wrt_input=False, guided=False, top_k_seeds=False, paired=True)


def run_cam(model: LoadedModel) -> np.ndarray:
    tensor = preprocess([solid((200, 10, 10), 16, 16)], model.config.input)
    seeds = np.eye(3, dtype=np.float32)[:1]
    result = model.gradients.run(CAM, model.input_name, tensor, seeds=seeds)
    assert result.grad_layer is not None
    return result.grad_layer


def test_prepare_writes_graphs_into_the_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_model_folder(tmp_path / "tiny")
    assert main(["prepare", "tiny", "--repository", str(tmp_path)]) == 0
    written = [Path(w) for w in capsys.readouterr().out.split() if w.endswith(".onnx")]
    assert len(written) == 12
    assert all(p.parent == tmp_path / "tiny" / "gradients" and p.is_file() for p in written)
    model = LoadedModel("tiny", tmp_path / "tiny", CPU, cache_dir=tmp_path / "cache")
    assert model.gradients.prepared_dir / CAM_USED.file_name(model.graph_sha256) in written
    run_cam(model)
    assert not (tmp_path / "cache").exists()  # the prepared graph was used, nothing rebuilt


def test_unprepared_graphs_go_to_the_cache_and_survive_a_read_only_model_folder(
    tmp_path: Path,
) -> None:
    folder = write_model_folder(tmp_path / "models" / "tiny")
    for path in (folder, *folder.iterdir()):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        cache = tmp_path / "cache"
        model = LoadedModel("tiny", folder, CPU, cache_dir=cache)
        first = run_cam(model)
        cached = cache / CAM_USED.file_name(model.graph_sha256)
        assert cached.is_file()
        stamp = os.stat(cached).st_mtime_ns
        again = LoadedModel("tiny", folder, CPU, cache_dir=cache)
        np.testing.assert_array_equal(run_cam(again), first)
        assert os.stat(cached).st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        folder.chmod(0o755)


def test_graph_file_names_separate_models_layers_and_variants() -> None:
    names = {
        GraphKey("a/b", False, False, False).file_name("0" * 64),
        GraphKey("a_b", False, False, False).file_name("0" * 64),
        GraphKey("a/b", False, False, True).file_name("0" * 64),
        GraphKey(None, True, True, False).file_name("0" * 64),
        GraphKey(None, True, True, False, paired=True).file_name("0" * 64),
        GraphKey("a/b", False, False, False).file_name("1" * 64),
    }
    assert len(names) == 6
    assert all("/" not in name for name in names)


def test_prepare_refuses_unknown_models(tmp_path: Path) -> None:
    assert main(["prepare", "../etc", "--repository", str(tmp_path)]) == 2
    assert main(["prepare", "missing", "--repository", str(tmp_path)]) == 2


def test_runs_with_one_seed_per_image_use_the_paired_graph_and_agree(tmp_path: Path) -> None:
    model = LoadedModel("tiny", write_model_folder(tmp_path / "tiny"), CPU, cache_dir=None)
    images = [solid((200, 10, 10), 16, 16), solid((10, 200, 10), 16, 16)]
    tensor = preprocess(images, model.config.input)
    graphs, name = model.gradients, model.input_name
    top_k = GraphKey("relu", wrt_input=True, guided=False, top_k_seeds=True)
    paired = graphs.run(top_k, name, tensor, top_k=1)
    scores = model.forward(tensor)
    seeds = np.eye(3, dtype=np.float32)[scores.argmax(axis=1)]
    np.testing.assert_array_equal(paired.targets, scores.argmax(axis=1))
    for row in range(2):
        # One image, several seeds: the broadcasting graph; its matching row must agree.
        several = graphs.run(CAM, name, tensor[row : row + 1], seeds=np.eye(3, dtype=np.float32))
        assert several.grad_layer is not None
        assert paired.grad_layer is not None
        target = int(seeds[row].argmax())
        np.testing.assert_allclose(
            paired.grad_layer[row], several.grad_layer[target], rtol=1e-5, atol=1e-7
        )
    used = {key.paired for key in graphs.sessions.resident_keys("gradient")}  # type: ignore[attr-defined]
    assert used == {True, False}


def test_graphs_on_disk_share_one_copy_of_each_weight(
    tmp_path: Path, default_model_dir: Path
) -> None:
    """Two gradient graphs of the default model in the cache: each distinct tensor is stored
    once, so the second graph costs its structure and its own derived tensors only."""
    cache = tmp_path / "cache"
    folder = default_model_dir / "efficientnet-lite0"
    model = LoadedModel("efficientnet-lite0", folder, CPU, cache_dir=cache)
    saliency = GraphKey(None, wrt_input=True, guided=False, top_k_seeds=True, paired=True)
    cam = GraphKey(
        model.default_layer, wrt_input=False, guided=False, top_k_seeds=True, paired=True
    )
    tensors = cache / "tensors"
    model.gradients.session(saliency)
    after_first = {p.name: p.stat().st_size for p in tensors.iterdir()}
    model.gradients.session(cam)
    after_second = {p.name: p.stat().st_size for p in tensors.iterdir()}
    graph_files = sorted(cache.glob("*.onnx"))
    assert len(graph_files) == 2
    model_bytes = (folder / "model.onnx").stat().st_size
    assert all(p.stat().st_size < model_bytes / 20 for p in graph_files)  # structure only
    new = sum(size for name, size in after_second.items() if name not in after_first)
    assert new < 0.2 * sum(after_first.values())  # the second graph reuses the first's tensors
    # The cached graph, read back with its external tensors, computes what the built one does.
    tensor = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    cached = onnx.load(str(cache / saliency.file_name(model.graph_sha256)))
    built = model.gradients.build(saliency)
    feeds = {model.input_name: tensor}
    got = ort.InferenceSession(cached.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    expected = ort.InferenceSession(
        built.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, feeds)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
