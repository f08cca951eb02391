"""The memory budget: LRU eviction, shared weights, lazy model loading, warm graphs."""

import base64
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.errors import OverBudget
from engines.graphs.prepared import GraphKey
from engines.imaging.decode import preprocess
from engines.methods.pipeline import WorkLimits
from engines.methods.registry import EXPLAINERS
from engines.methods.saliency import mean_input_gradient
from engines.models.loaded import LoadedModel
from engines.models.repository import ModelRepository, ModelState
from engines.runtime.deadline import Deadline
from engines.runtime.memory import MemoryBudget, resident_bytes
from engines.runtime.session import ModelSession
from schemas.params import CamParams
from service.app import create_app
from service.settings import Settings
from tests.conftest import CPU
from tests.images import encode, photo
from tests.tiny_models import write_model_folder

MIB = 1 << 20


def test_budget_evicts_the_least_recently_used_entry() -> None:
    budget = MemoryBudget(100)
    evicted: list[str] = []
    first = budget.admit("gradient", "m", 40, lambda: evicted.append("first"))
    budget.admit("gradient", "m", 40, lambda: evicted.append("second"))
    budget.touch(first)  # now the second is the least recently used
    budget.admit("activations", "m", 40, lambda: evicted.append("third"))
    assert evicted == ["second"]
    usage = budget.usage()
    assert usage.resident_bytes == 80
    assert usage.evictions == {"gradient": 1}


def test_work_reserves_evict_entries_and_what_cannot_fit_is_refused() -> None:
    budget = MemoryBudget(100)
    evicted: list[int] = []
    budget.admit("gradient", "m", 60, lambda: evicted.append(1))
    with budget.reserve(50, "a batch"):
        assert evicted == [1]
        assert budget.usage().reserved_bytes == 50
        with pytest.raises(OverBudget), budget.reserve(60, "a second batch"):
            pass
    assert budget.usage().reserved_bytes == 0
    with pytest.raises(OverBudget):
        budget.admit("gradient", "m", 101, lambda: None)


def test_builds_are_bounded_and_a_waiting_request_gives_up_at_its_deadline() -> None:
    budget = MemoryBudget(100, max_builds=1)
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.build_slot("gradient"):
            started.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    started.wait(5)
    assert budget.usage().builds_in_flight == 1
    before = time.monotonic()
    with Deadline(0.2).activate(), pytest.raises(OverBudget), budget.build_slot("gradient"):
        pass
    assert 0.15 <= time.monotonic() - before < 2
    release.set()
    holder.join()
    with budget.build_slot("gradient"):
        assert budget.usage().builds_in_flight == 1


def _tensor(model: LoadedModel) -> np.ndarray:
    spec = model.config.input
    rng = np.random.default_rng(1)
    return preprocess([rng.integers(0, 256, (spec.height, spec.width, 3), np.uint8)], spec)


def _gradcam(model: LoadedModel, tensor: np.ndarray, layer: str) -> np.ndarray:
    explained = EXPLAINERS["gradcam"].explain(
        model, tensor, [0], 1, CamParams(layer=layer), WorkLimits()
    )
    return explained.maps[0].heatmap


def test_an_evicted_graph_is_rebuilt_and_answers_the_same_map(default_model_dir: Path) -> None:
    probe = LoadedModel("efficientnet-lite0", default_model_dir / "efficientnet-lite0", CPU)
    # Room for one prepared graph (~1 MiB between runs) and one run of it (twice a forward's
    # activations); the model itself is the repository's entry, not counted here.
    budget = MemoryBudget(2 * probe.activation_bytes + MIB + MIB // 2)
    model = LoadedModel(
        "efficientnet-lite0", default_model_dir / "efficientnet-lite0", CPU, budget=budget
    )
    tensor = _tensor(model)
    first, second = model.layers[-1].name, model.layers[-4].name
    before = _gradcam(model, tensor, first)
    _gradcam(model, tensor, second)
    key = GraphKey(first, wrt_input=False, guided=False, top_k_seeds=False, paired=True)
    assert not model.gradients.resident(key)
    assert budget.usage().evictions.get("gradient", 0) >= 1
    again = _gradcam(model, tensor, first)
    assert model.gradients.resident(key)
    np.testing.assert_allclose(again, before, rtol=1e-5, atol=1e-6)


def test_a_second_graph_shares_the_weights(default_model_dir: Path, tmp_path: Path) -> None:
    model = LoadedModel(
        "efficientnet-lite0", default_model_dir / "efficientnet-lite0", CPU, tmp_path
    )
    weight_bytes = model.weights.bytes
    assert weight_bytes > 10 * MIB
    tensor = _tensor(model)
    key = model.gradients.warm_keys(model.default_layer)[0]
    model.gradients.session(key)  # the graph file is built and cached: only the session counts
    model.sessions.clear()
    shared = len(model.weights)
    before = resident_bytes()
    model.gradients.run(key, model.input_name, tensor, top_k=1)
    added = resident_bytes() - before
    # Without sharing this session holds ~30 MiB (the weights, blocked again); shared, ~1 MiB.
    assert added < 0.3 * weight_bytes, f"+{added / MIB:.1f} MiB for a second graph"
    assert len(model.weights) == shared


def _tiny_repository(root: Path, names: list[str]) -> None:
    for name in names:
        write_model_folder(root / name)


def test_models_load_on_first_use_and_the_least_recently_used_unloads(tmp_path: Path) -> None:
    _tiny_repository(tmp_path, ["a", "b", "c"])
    probe = LoadedModel("a", tmp_path / "a", CPU)
    # Two models fit; a third pushes out the least recently used one.
    budget = MemoryBudget(int(2.5 * probe.cost_bytes))
    repository = ModelRepository(tmp_path, CPU, budget=budget, warm=False)
    repository.load_all()
    states = {e.name: e.state for e in repository.entries()}
    assert sorted(states.values()) == [ModelState.LOADED, ModelState.LOADED, ModelState.UNLOADED]
    assert repository.ready
    unloaded = next(name for name, state in states.items() if state is ModelState.UNLOADED)
    loaded = sorted(name for name, state in states.items() if state is ModelState.LOADED)
    repository.get(loaded[1])  # loaded[0] is now the least recently used
    model = repository.get(unloaded)
    assert repository.entry(unloaded).state is ModelState.LOADED
    assert repository.entry(loaded[0]).state is ModelState.UNLOADED
    assert repository.entry(loaded[1]).state is ModelState.LOADED
    assert model.predict([np.full((16, 16, 3), (255, 0, 0), np.uint8)], 1)[0][0].label == "red"
    again = repository.get(loaded[0])  # loads again on use
    assert again.predict([np.full((16, 16, 3), (0, 0, 255), np.uint8)], 1)[0][0].label == "blue"


def test_warm_graphs_are_built_and_persisted_at_load(tmp_path: Path) -> None:
    _tiny_repository(tmp_path / "models", ["tiny"])
    cache = tmp_path / "cache"
    repository = ModelRepository(tmp_path / "models", CPU, cache_dir=cache)
    repository.load_all()
    model = repository.get("tiny")
    keys = model.gradients.warm_keys(model.default_layer)
    assert len(keys) == 3
    assert all(model.gradients.resident(key) for key in keys)
    assert len(list((cache / "tiny").glob("*.onnx"))) == 3
    settings = Settings(model_repository=tmp_path / "models", cache_dir=cache, providers="cpu")
    with TestClient(create_app(settings, repository)) as client:
        info = client.get("/v1/models/tiny").json()
        assert info["state"] == "loaded"
        assert {g["method"]: g["warm"] for g in info["graphs"]} == {
            "gradcam": True,
            "saliency": True,
            "guided_backprop": True,
        }
        listing = client.get("/v1/models").json()
        memory = listing["memory"]
        assert memory["budget_bytes"] == repository.budget.limit_bytes
        assert memory["resident_bytes"]["model"] > 0
        assert memory["resident_bytes"]["gradient"] > 0
        assert memory["process_resident_bytes"] > 0
        other = next(layer.name for layer in model.layers if layer.name != model.default_layer)
        image = base64.b64encode(encode(np.full((16, 16, 3), (255, 0, 0), np.uint8))).decode()
        body = {"image": image, "method": "gradcam", "params": {"layer": other}}
        assert client.post("/v1/models/tiny/explain", json=body).status_code == 200
        metrics = client.get("/metrics").text
        assert "onnx_explain_memory_budget_bytes" in metrics
        assert 'onnx_explain_cache_bytes{kind="gradient"}' in metrics
        # The warm graphs were built before the app existed; the new layer's graph is timed.
        assert 'onnx_explain_graph_build_duration_seconds_count{kind="gradient"} 1.0' in metrics


def test_a_burst_over_many_layers_under_a_small_budget_gets_200s_or_503s(
    default_model_dir: Path, tmp_path: Path
) -> None:
    budget_bytes = 400 * MIB
    settings = Settings(
        model_repository=default_model_dir,
        cache_dir=tmp_path / "cache",
        providers="cpu",
        intra_op_threads=1,
        memory_budget_bytes=budget_bytes,
        warm_graphs=False,
    )
    app = create_app(settings)
    image = base64.b64encode(encode(photo("chelsea"), ".jpg")).decode()
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.1)
        layers = [
            layer["name"] for layer in client.get("/v1/models/efficientnet-lite0").json()["layers"]
        ]
        chosen = layers[:: max(1, len(layers) // 12)][:12]
        start = resident_bytes()

        def explain(layer: str) -> int:
            body = {"image": image, "method": "gradcam", "params": {"layer": layer}}
            return client.post("/v1/models/efficientnet-lite0/explain", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(explain, chosen * 2))
        grown = resident_bytes() - start
        assert set(statuses) <= {200, 503}, statuses
        assert 200 in statuses
        # The budget bounds what the caches and runs ask for; 300 MiB covers the interpreter's
        # and onnxruntime's own bookkeeping and the requests' images and maps.
        assert grown < budget_bytes + 300 * MIB, f"grew {grown / MIB:.0f} MiB"
        usage = client.get("/v1/models").json()["memory"]
        assert usage["used_bytes"] <= budget_bytes
        assert client.get("/v1/models/efficientnet-lite0").json()["state"] in ("loaded", "unloaded")
        assert explain(chosen[0]) in (200, 503)
        assert (
            client.post("/v1/models/efficientnet-lite0/predict", json={"image": image}).status_code
            == 200
        )


def test_smoothgrad_batches_shrink_to_what_the_budget_has_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big job holding most of the budget leaves room for five rows a run: smoothgrad runs
    its 40 noisy copies five at a time and gets the map it gets with the budget to itself."""
    budget = MemoryBudget(256 * MIB)
    folder = write_model_folder(tmp_path / "tiny", size=224)
    model = LoadedModel("tiny", folder, CPU, budget=budget)
    rows = np.random.default_rng(0).standard_normal((40, 3, 224, 224)).astype(np.float32)
    seen: list[int] = []
    run = ModelSession.run

    def counting_run(self: ModelSession, feeds: dict[str, np.ndarray], *rest: Any) -> Any:
        seen.append(max(v.shape[0] for v in feeds.values() if v.ndim == 4))
        return run(self, feeds, *rest)

    monkeypatch.setattr(ModelSession, "run", counting_run)
    alone = mean_input_gradient(model, rows, target=1)
    assert seen == [16, 16, 8]  # CHUNK_ROWS when the budget is free
    per_row = model.gradients.activation_bytes
    held = budget.limit_bytes - budget.usage().resident_bytes - 5 * per_row
    seen.clear()
    with budget.reserve(held, "another job"):
        squeezed = mean_input_gradient(model, rows, target=1)
        assert budget.usage().evictions == {}  # the graph stayed; only the batches shrank
    assert seen == [5] * 8
    np.testing.assert_allclose(squeezed, alone, rtol=1e-5, atol=1e-7)


def test_the_service_budget_counts_what_its_estimates_miss() -> None:
    """Sessions can hold more than their graphs' estimates: the service's budget also counts
    the process's measured growth, so memory that no estimate knows of still evicts."""
    measured = MemoryBudget(64 * MIB, measure_process=True)
    estimated = MemoryBudget(64 * MIB)
    evicted: list[str] = []
    for budget, name in ((measured, "measured"), (estimated, "estimated")):
        budget.admit("model", name, MIB, functools.partial(evicted.append, name))
    unseen = np.ones(96 * MIB // 8)  # written, so resident
    # read before the eviction's trim, which may also hand back pages that earlier tests'
    # idle threads freed after the baseline
    assert measured.used_bytes() >= 0.9 * unseen.nbytes
    for budget, name in ((measured, "measured"), (estimated, "estimated")):
        budget.admit("model", f"{name}-2", MIB, functools.partial(evicted.append, f"{name}-2"))
    assert evicted == ["measured"]
    assert estimated.used_bytes() == 2 * MIB


def _fragmented_heap(megabytes: int) -> tuple[list[bytearray], list[bytearray]]:
    """Many small heap blocks (not mmapped), and every 50th of them to keep after the rest go:
    the heap cannot shrink from its top, so freeing them alone returns nothing."""
    blocks = [bytearray(16000) for _ in range(megabytes * 1000 // 16)]
    return blocks, blocks[::50]


def test_evicting_hands_freed_heap_memory_back_to_the_system() -> None:
    """Resident memory must fall once evicted sessions are gone, or a budget that measures it
    keeps evicting everything at every admission."""
    blocks, kept = _fragmented_heap(300)
    budget = MemoryBudget(limit_bytes=1 << 30)
    budget.admit("gradient", "m", 200 << 20, blocks.clear)
    before = resident_bytes()

    budget.admit("gradient", "m", 900 << 20, lambda: None)  # evicts the first

    assert not blocks
    assert len(kept) > 100
    assert before - resident_bytes() > 200 << 20
