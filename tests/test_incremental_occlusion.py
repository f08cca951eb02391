"""Exact incremental occlusion (Krypton), fast mode and batch threads, against plain occlusion."""

import base64
import itertools
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.graphs.incremental import EMPTY, Step, cut_candidates, plan_cut
from engines.imaging.decode import preprocess
from engines.methods.occlusion import Occlusion, window_starts
from engines.methods.pipeline import WorkLimits
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions
from schemas.params import OcclusionParams
from service.settings import Settings, cores
from tests.conftest import CPU
from tests.images import encode
from tests.tiny_models import write_model_folder


@pytest.fixture(scope="module")
def residual_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = write_model_folder(
        tmp_path_factory.mktemp("incremental") / "residual", "strided_residual", size=32
    )
    return LoadedModel("residual", folder, CPU)


def random_image(size: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def test_interval_arithmetic_matches_the_ops_definition() -> None:
    """For every small Step, the outputs found to read a changed range are those that read it
    by the definition, and the inputs found to be needed span those read, a read of
    the padding reaching to the border (so a crop meets the true padding there)."""
    for kernel, stride, begin, end, dilation in itertools.product(
        (1, 2, 3, 5), (1, 2), (0, 1, 2), (0, 1), (1, 2)
    ):
        step = Step(kernel, stride, begin, end, dilation)
        n = 11
        n_out = step.size(n)
        taps = [{o * stride - begin + j * dilation for j in range(kernel)} for o in range(n_out)]
        reads = [tap & set(range(n)) for tap in taps]
        for a, b in itertools.combinations(range(n + 1), 2):
            changed = [o for o in range(n_out) if reads[o] & set(range(a, b))]
            expected = (changed[0], changed[-1] + 1) if changed else EMPTY
            found = step.forward((a, b), n_out)
            if dilation == 1:
                assert found == expected, (step, a, b)
            else:  # a dilated kernel skips positions: the range found may be wider
                assert not changed or found[0] <= expected[0] < expected[1] <= found[1]
            if a < n_out and b <= n_out:
                read = set().union(*(taps[o] for o in range(a, b)))
                low = min(max(0, min(read)), n - 1)
                wanted = (low, max(min(n, max(read) + 1), low + 1))
                assert step.backward((a, b), n) == wanted, (step, a, b)


def test_every_cut_scores_every_window_as_the_whole_graph_does(
    residual_model: LoadedModel,
) -> None:
    """Asymmetric pads, a residual Add, Pad, MaxPool and a SAME_UPPER Conv: each cut the graph
    offers gives the plain scores for windows at the borders and inside, within rounding."""
    model = residual_model
    tensor = preprocess([random_image(32)], model.config.input)
    cuts = cut_candidates(model.graph.graph, model.input_name)
    assert "residual" in cuts
    assert "head_relu" in cuts
    assert "depthwise" not in cuts  # the residual branch still needs expand_clip
    params = OcclusionParams(window=5, stride=3, score="logit")
    tops = window_starts(32, 5, 3)
    grid = [a.ravel() for a in np.meshgrid(tops, tops, indexing="ij")]
    baseline = Occlusion.baseline(model, tensor, params)
    plain = Occlusion.host_copies(
        model, tensor, baseline, Occlusion.scorer(model, params), grid[0].size, 5
    )(*grid)
    for cut in cuts:
        plan = plan_cut(model.graph.graph, model.input_name, 5, (tops, tops), cut=cut)
        assert plan is not None, cut
        scores = Occlusion.incremental_copies(model, plan, tensor, baseline, params)(*grid)
        np.testing.assert_allclose(scores, plain, rtol=1e-5, atol=1e-5, err_msg=cut)


@pytest.mark.parametrize(
    "params",
    [
        {"window": 4, "stride": 4, "score": "logit"},
        {"window": 6, "stride": 5, "baseline": "mean"},
        {"window": 3, "stride": 2, "baseline": "blur", "score": "logit"},
    ],
)
def test_incremental_occlusion_equals_plain_occlusion(
    residual_model: LoadedModel, params: dict[str, object]
) -> None:
    model = residual_model
    tensor = preprocess([random_image(32, seed=9)], model.config.input)
    parsed = OcclusionParams.model_validate(params)
    tops = window_starts(32, parsed.window, parsed.stride)
    plan = model.incremental_plan(parsed.window, tops, tops)
    assert plan is not None
    assert plan.incremental_macs < 0.9 * plan.plain_macs
    # A small budget: several batches, each with windows of different crops.
    limits = WorkLimits(memory_budget_bytes=7 * 3 * 32 * 32 * 4 * 32)
    plain = Occlusion(incremental=False).explain(model, tensor, [0, 2], 1, parsed, limits)
    fast = Occlusion().explain(model, tensor, [0, 2], 1, parsed, limits)
    assert plain.passes == fast.passes == tops.size**2
    for expected, found in zip(plain.maps, fast.maps, strict=True):
        np.testing.assert_allclose(found.heatmap, expected.heatmap, rtol=1e-5, atol=1e-6)


def test_a_graph_without_a_local_prefix_has_no_cut(tmp_path: Path) -> None:
    model = LoadedModel("mean", write_model_folder(tmp_path / "mean", "channel_mean"), CPU)
    starts = window_starts(16, 4, 4)
    assert cut_candidates(model.graph.graph, model.input_name) == []
    assert model.incremental_plan(4, starts, starts) is None


def test_incremental_occlusion_is_exact_on_the_default_model(default_model_dir: Path) -> None:
    """EfficientNet-Lite0 (TF "same" pads): the cut saves multiply-adds and changes nothing."""
    model = LoadedModel("lite0", default_model_dir / "efficientnet-lite0", CPU)
    tensor = preprocess([random_image(224, seed=2)], model.config.input)
    params = OcclusionParams(window=16, stride=48, score="logit")
    starts = window_starts(224, 16, 48)
    plan = model.incremental_plan(16, starts, starts)
    assert plan is not None
    assert plan.incremental_macs < 0.85 * plan.plain_macs
    plain = Occlusion(incremental=False).explain(model, tensor, [281], 1, params)
    ours = Occlusion().explain(model, tensor, [281], 1, params)
    scale = float(np.abs(plain.maps[0].heatmap).max())
    np.testing.assert_allclose(ours.maps[0].heatmap, plain.maps[0].heatmap, atol=1e-4 * scale)


def test_fast_mode_is_exact_where_it_drills_down_and_runs_fewer_passes(
    residual_model: LoadedModel,
) -> None:
    model = residual_model
    tensor = preprocess([random_image(32, seed=11)], model.config.input)
    exact_params = OcclusionParams(window=4, stride=2, score="logit")
    exact = Occlusion().explain(model, tensor, [1], 1, exact_params)
    fast_params = exact_params.model_copy(update={"mode": "fast", "fast_fraction": 0.1})
    fast = Occlusion().explain(model, tensor, [1], 1, fast_params)
    assert exact.passes is not None
    assert fast.passes is not None
    assert fast.passes < exact.passes
    exact_map, fast_map = exact.maps[0].heatmap, fast.maps[0].heatmap
    # Where it drilled down (at least the fraction asked for) the map is the exact one.
    same = np.isclose(fast_map, exact_map, rtol=1e-5, atol=1e-6)
    assert same.mean() >= 0.1
    assert np.corrcoef(fast_map.ravel(), exact_map.ravel())[0, 1] > 0.8
    everything = fast_params.model_copy(update={"fast_fraction": 1.0})
    whole = Occlusion().explain(model, tensor, [1], 1, everything)
    assert whole.passes == exact.passes
    np.testing.assert_allclose(whole.maps[0].heatmap, exact_map, rtol=1e-5, atol=1e-6)


def test_batch_work_runs_on_its_own_session_with_its_threads(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "residual", "strided_residual", size=32)
    apart = RuntimeOptions(providers="cpu", intra_op_threads=1, batch_intra_op_threads=2)
    assert apart.batches_apart
    assert apart.for_batches().intra_op_threads == 2
    assert not CPU.batches_apart
    assert CPU.for_batches() == CPU
    model = LoadedModel("residual", folder, apart)
    batch = preprocess([random_image(32, seed=s) for s in range(3)], model.config.input)
    np.testing.assert_allclose(model.forward_batch(batch), model.forward(batch), rtol=1e-6)
    assert model.sessions.resident(model.sessions.batch_kind("forward"), None)


def test_the_batch_threads_setting_reaches_the_runtime_options() -> None:
    assert Settings(batch_intra_op_threads=3).runtime_options().batch_intra_op_threads == 3
    default = Settings(workers=1, intra_op_threads=1).runtime_options()
    assert default.intra_op_threads == 1
    assert default.for_batches().intra_op_threads == cores()


def test_the_answer_counts_the_passes_over_http(tiny_client: TestClient) -> None:
    image = base64.b64encode(encode(random_image(16))).decode()

    def explain(params: dict[str, object]) -> dict[str, object]:
        response = tiny_client.post(
            "/v1/models/tiny/explain",
            json={"image": image, "method": "occlusion", "params": params},
        )
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    assert explain({"window": 2, "stride": 2})["passes"] == 64
    fast = explain({"window": 2, "stride": 2, "mode": "fast", "fast_fraction": 0.05})["passes"]
    assert isinstance(fast, int)
    assert 16 <= fast < 64
    bad = tiny_client.post(
        "/v1/models/tiny/explain",
        json={
            "image": image,
            "method": "occlusion",
            "params": {"mode": "fast", "fast_fraction": 0},
        },
    )
    assert bad.status_code == 422
    saliency = tiny_client.post(
        "/v1/models/tiny/explain", json={"image": image, "method": "saliency"}
    )
    assert saliency.status_code == 200
    assert saliency.json()["passes"] is None
