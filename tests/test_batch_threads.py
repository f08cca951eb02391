"""Long jobs run on sessions with the batch threads (issue 17, part 1), with the same results
as on the short requests' sessions, and no second session when the thread counts agree."""

import threading
import time

import numpy as np
import pytest
from pydantic import BaseModel

from engines.graphs.prepared import GraphKey
from engines.imaging.decode import preprocess
from engines.methods.metrics import faithfulness
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import LoadedModel
from engines.runtime import contention
from engines.runtime.deadline import Deadline
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


def wait_until_quiet() -> None:
    """Batch work widens only while no other request's short run is recent: requests of the
    tests before (other threads, their own deadlines) must have ended first."""
    deadline = time.monotonic() + 10
    while contention.SHORT_RUNS.recent():
        assert time.monotonic() < deadline, "short runs of other requests did not stop"
        time.sleep(contention.QUIET_SECONDS)


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
    wait_until_quiet()
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
    wait_until_quiet()
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
    wait_until_quiet()
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


def test_batch_work_leaves_the_cores_to_a_short_request_that_is_running(
    models: tuple[LoadedModel, LoadedModel],
) -> None:
    """While another request's short run is in flight, batch work takes the short sessions
    (their fewer threads); once it is over, the wide batch sessions again."""
    apart, _ = models
    occlusion = EXPLAINERS["occlusion"]
    params = occlusion.params_model(**LONG_METHODS["occlusion"])
    tensor = preprocess([image()], apart.config.input)
    started, release = threading.Event(), threading.Event()

    def short_request() -> None:
        with Deadline(30).activate(), contention.SHORT_RUNS.running():
            started.set()
            release.wait(30)

    other = threading.Thread(target=short_request)
    other.start()
    try:
        assert started.wait(10)
        assert contention.SHORT_RUNS.recent()
        _, batch_before = runs(apart)
        occlusion.explain(apart, tensor, [1], 1, params)
        assert runs(apart)[1] == batch_before
        # Batch work's forward runs go to the forward session itself, not to a second copy.
        apart.forward_batch(np.repeat(tensor, 3, axis=0))
        assert runs(apart)[1] == batch_before
        assert not apart.sessions.resident("forward", None)
    finally:
        release.set()
        other.join()
    time.sleep(contention.QUIET_SECONDS * 2)
    assert not contention.SHORT_RUNS.recent()
    occlusion.explain(apart, tensor, [1], 1, params)
    assert runs(apart)[1] > batch_before


def test_a_requests_own_runs_and_batch_work_never_count_as_contention() -> None:
    with Deadline(30).activate():
        with contention.SHORT_RUNS.running():
            assert not contention.SHORT_RUNS.recent()  # its own run
        assert not contention.SHORT_RUNS.recent()
    time.sleep(contention.QUIET_SECONDS * 2)
    seen: list[bool] = []

    def batch_request() -> None:
        with Deadline(30).activate():
            contention.mark_batch_work()
            with contention.run_kind():  # a batch job's run is not a short one
                seen.append(contention.doing_batch_work())

    thread = threading.Thread(target=batch_request)
    thread.start()
    thread.join()
    assert seen == [True]
    assert not contention.SHORT_RUNS.recent()
