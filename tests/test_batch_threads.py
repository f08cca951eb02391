"""Long jobs run on sessions with the batch threads (issue 17, part 1), with the same results
as on the short requests' sessions, and no second session when the thread counts agree."""

import numpy as np
import pytest
from pydantic import BaseModel

from engines.graphs.prepared import GraphKey
from engines.imaging.decode import preprocess
from engines.methods.metrics import faithfulness
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions
from tests.tiny_models import write_model_folder

SIZE = 16
APART = RuntimeOptions(providers="cpu", intra_op_threads=1, batch_intra_op_threads=2)
TOGETHER = RuntimeOptions(providers="cpu", intra_op_threads=1, batch_intra_op_threads=1)
LONG_METHODS = {
    "smoothgrad": {"samples": 6},
    "integrated_gradients": {"steps": 6},
    "gradientshap": {"samples": 6},
    "occlusion": {"window": 4, "stride": 4},
    "rise": {"masks": 24},
    "lime": {"samples": 24},
    "kernelshap": {"samples": 24},
    "scorecam": {},
    "ablationcam": {},
}
SHORT_RUNS = 2
"""What a long job may run on the short requests' sessions: its clean image's passes."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel]:
    folder = write_model_folder(tmp_path_factory.mktemp("threads") / "cnn", size=SIZE)
    return LoadedModel("apart", folder, APART), LoadedModel("together", folder, TOGETHER)


def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def runs(model: LoadedModel) -> tuple[int, int]:
    """Runs so far on the short requests' sessions and on batch work's own."""
    counts = model.sessions.runs()
    batch = sum(n for kind, n in counts.items() if kind.endswith(":batch"))
    return model.session.runs + sum(counts.values()) - batch, batch


def test_the_options_say_when_batch_work_runs_apart() -> None:
    assert APART.batches_apart
    assert not TOGETHER.batches_apart
    assert not RuntimeOptions(providers="cpu", intra_op_threads=2).batches_apart


@pytest.mark.parametrize("method", sorted(LONG_METHODS))
def test_a_long_method_runs_on_the_batch_session_with_the_same_result(
    models: tuple[LoadedModel, LoadedModel], method: str
) -> None:
    apart, together = models
    explainer = EXPLAINERS[method]
    params: BaseModel = explainer.params_model(**LONG_METHODS[method])
    tensor = preprocess([image()], apart.config.input)
    short_before, batch_before = runs(apart)
    result = explainer.explain(apart, tensor, [1], 1, params)
    short_after, batch_after = runs(apart)
    assert batch_after > batch_before
    assert short_after - short_before <= SHORT_RUNS
    expected = explainer.explain(together, tensor, [1], 1, params)
    for got, wanted in zip(result.maps, expected.maps, strict=True):
        np.testing.assert_allclose(got.heatmap, wanted.heatmap, rtol=1e-5, atol=1e-6)
    assert runs(together)[1] == 0


def test_deletion_and_insertion_curves_run_on_the_batch_session(
    models: tuple[LoadedModel, LoadedModel],
) -> None:
    apart, together = models
    heatmap = np.random.default_rng(4).random((SIZE, SIZE))
    short_before, batch_before = runs(apart)
    curves = faithfulness(apart, image(), heatmap, 1, ("deletion", "insertion"), steps=8)
    short_after, batch_after = runs(apart)
    assert batch_after > batch_before
    assert short_after == short_before
    expected = faithfulness(together, image(), heatmap, 1, ("deletion", "insertion"), steps=8)
    for kind, curve in curves.items():
        np.testing.assert_allclose(curve.scores, expected[kind].scores, rtol=1e-5, atol=1e-7)
    assert runs(together)[1] == 0


def test_batch_sessions_have_the_batch_threads_and_equal_threads_build_none(
    models: tuple[LoadedModel, LoadedModel],
) -> None:
    apart, together = models
    tensor = preprocess([image()], apart.config.input)
    EXPLAINERS["smoothgrad"].explain(apart, tensor, [0], 1, EXPLAINERS["smoothgrad"].params_model())
    assert apart.session.intra_op_threads == 1
    key = GraphKey(None, wrt_input=True, guided=False, top_k_seeds=False, paired=True)
    assert apart.sessions.resident_keys(apart.sessions.batch_kind("gradient")) == [key]
    assert apart.gradients.session(key, batch_work=True).intra_op_threads == 2
    assert apart.gradients.session(key).intra_op_threads == 1
    assert apart.sessions.batch_kind("gradient") in apart.sessions.runs()
    assert apart.budget.usage().entries_by_kind[apart.sessions.batch_kind("gradient")] == 1
    # Equal thread counts: batch work finds the short requests' sessions, and builds nothing.
    for method, values in LONG_METHODS.items():
        explainer = EXPLAINERS[method]
        explainer.explain(together, tensor, [0], 1, explainer.params_model(**values))
    kinds = together.sessions.runs()
    assert "gradient" in kinds
    assert not [kind for kind in kinds if kind.endswith(":batch")]
    assert not [kind for kind in together.budget.usage().by_kind if kind.endswith(":batch")]
    assert together.gradients.session(key, batch_work=True) is together.gradients.session(key)
