"""Cross-request batching, bounded queues and deadlines."""

import base64
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from engines.errors import DeadlineExceeded, Overloaded
from engines.imaging.decode import preprocess
from engines.models.loaded import LoadedModel
from engines.runtime.batcher import BatchPolicy, MicroBatcher
from engines.runtime.deadline import Deadline
from engines.runtime.session import RuntimeOptions
from service.settings import Settings
from tests.conftest import CPU
from tests.images import encode, photo, solid
from tests.tiny_models import write_model_folder


def test_concurrent_submits_share_one_batch_and_get_their_own_rows() -> None:
    calls: list[int] = []

    def double(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        return [2 * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        "test", double, BatchPolicy(window_seconds=0.2, max_rows=8, max_queued=16)
    )
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(batcher.submit, range(8)))
    assert results == [2 * i for i in range(8)]
    assert sum(calls) == 8
    assert max(calls) > 1  # gathered, not one run per caller


def test_a_full_queue_refuses_at_once() -> None:
    release = threading.Event()

    def slow(items: Sequence[int]) -> list[int]:
        release.wait(5)
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(
        "test", slow, BatchPolicy(window_seconds=0.0, max_rows=1, max_queued=2)
    )
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(batcher.submit, i) for i in range(3)]
        time.sleep(0.2)  # one item runs, two wait: the queue is full
        started = time.monotonic()
        with pytest.raises(Overloaded):
            batcher.submit(99)
        assert time.monotonic() - started < 0.5
        release.set()
        assert sorted(f.result(5) for f in running) == [0, 1, 2]


def test_an_idle_batcher_lets_go_of_what_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its thread ends when no work comes, so an evicted model the batcher runs for can be
    freed (a thread per batcher used to hold every evicted model's graphs for good), and the
    next submit starts a thread again."""
    import gc
    import weakref

    from engines.runtime import batcher as batching

    monkeypatch.setattr(batching, "IDLE_EXIT_SECONDS", 0.05)

    class Model:
        def run(self, items: Sequence[int]) -> list[int]:
            return [2 * i for i in items]

    model = Model()
    alive = weakref.ref(model)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        "idle", model.run, BatchPolicy(window_seconds=0.0, max_rows=4, max_queued=4)
    )
    assert batcher.submit(3) == 6
    time.sleep(0.5)
    assert not any(t.name == "batcher-idle" for t in threading.enumerate())
    assert batcher.submit(4) == 8  # a new thread

    del model, batcher
    time.sleep(0.5)
    gc.collect()
    assert alive() is None


def test_a_request_whose_deadline_passes_in_the_queue_gets_deadline_exceeded() -> None:
    release = threading.Event()

    def slow(items: Sequence[int]) -> list[int]:
        release.wait(2)
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(
        "test", slow, BatchPolicy(window_seconds=0.0, max_rows=1, max_queued=8)
    )

    def submit_with_deadline() -> int:
        with Deadline(0.1).activate():
            return batcher.submit(2)

    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(batcher.submit, 1)
        time.sleep(0.05)
        late = pool.submit(submit_with_deadline)
        with pytest.raises(DeadlineExceeded):
            late.result(5)
        release.set()
        assert blocker.result(5) == 1


def test_batched_forward_equals_single_runs(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "m")
    policy = BatchPolicy(window_seconds=0.05, max_rows=16, max_queued=64)
    batched = LoadedModel("m", folder, CPU, batch_policy=policy)
    plain = LoadedModel("m", folder, CPU)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda image: batched.probabilities([image]), images))
    for image, row in zip(images, together, strict=True):
        np.testing.assert_allclose(row, plain.probabilities([image]), rtol=1e-5, atol=1e-7)


def test_batched_gradients_equal_single_runs(tmp_path: Path) -> None:
    from engines.methods.registry import EXPLAINERS

    folder = write_model_folder(tmp_path / "m")
    policy = BatchPolicy(window_seconds=0.05, max_rows=16, max_queued=64)
    batched = LoadedModel("m", folder, CPU, tmp_path / "cache", batch_policy=policy)
    plain = LoadedModel("m", folder, CPU, tmp_path / "cache")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    gradcam = EXPLAINERS["gradcam"]

    def cam(model: LoadedModel, image: np.ndarray) -> np.ndarray:
        tensor = preprocess([image], model.config.input)
        return gradcam.explain(model, tensor, None, 1, gradcam.params_model()).maps[0].heatmap

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda image: cam(batched, image), images))
    for image, heatmap in zip(images, together, strict=True):
        np.testing.assert_allclose(heatmap, cam(plain, image), rtol=1e-5, atol=1e-7)


def test_deadline_terminates_a_running_onnxruntime_call(default_model_dir: Path) -> None:
    model = LoadedModel("lite0", default_model_dir / "efficientnet-lite0", CPU)
    batch = np.repeat(preprocess([photo("chelsea")], model.config.input), 64, axis=0)
    started = time.monotonic()
    model.forward(batch)
    full = time.monotonic() - started
    started = time.monotonic()
    with Deadline(full / 10).activate(), pytest.raises(DeadlineExceeded):
        model.forward(batch)
    assert time.monotonic() - started < full / 2


def test_a_request_past_its_deadline_gets_504_and_the_service_goes_on(
    client: TestClient,
) -> None:
    image = base64.b64encode(encode(photo("chelsea"))).decode()
    started = time.monotonic()
    response = client.post(
        "/v1/models/efficientnet-lite0/explain",
        json={
            "image": image,
            "method": "occlusion",
            "params": {"window": 8, "stride": 4},
            "timeout_ms": 300,
        },
    )
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 5
    good = client.post(
        "/v1/models/tiny/predict",
        json={"image": base64.b64encode(encode(solid((9, 200, 9)))).decode()},
    )
    assert good.status_code == 200


@pytest.mark.parametrize(
    ("cores", "workers", "expected"), [(1, 1, 1), (2, 1, 1), (2, 2, 1), (16, 1, 15), (16, 4, 3)]
)
def test_default_threads_leave_a_core_to_the_request_side(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, expected: int
) -> None:
    monkeypatch.setattr("service.settings.cores", lambda: cores)
    settings = Settings(workers=workers)
    assert settings.threads_per_session == expected
    assert settings.threads_per_session * workers <= max(cores, workers)
    assert Settings(workers=workers, intra_op_threads=5).threads_per_session == 5


def test_sessions_without_spin_waiting_give_the_same_answers(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "tiny")
    images = [solid((200, 10, 10), 16, 16), solid((10, 10, 200), 16, 16)]
    spinning = LoadedModel("tiny", folder, CPU, cache_dir=None)
    sleeping = LoadedModel(
        "tiny", folder, RuntimeOptions("cpu", 2, spin_wait=False), cache_dir=None
    )
    np.testing.assert_array_equal(spinning.probabilities(images), sleeping.probabilities(images))


def test_callers_that_waited_out_the_window_during_a_run_go_at_once() -> None:
    """The window counts from the oldest caller's arrival, not from when the batcher looks."""
    started_runs: list[float] = []
    release = threading.Event()

    def record(items: Sequence[int]) -> list[int]:
        started_runs.append(time.monotonic())
        if len(started_runs) == 1:
            release.wait(5)
        return list(items)

    window = 0.3
    batcher: MicroBatcher[int, int] = MicroBatcher(
        "test", record, BatchPolicy(window_seconds=window, max_rows=8, max_queued=8)
    )
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.submit, 1)
        time.sleep(window + 0.1)  # the first batch is running now
        queued = [pool.submit(batcher.submit, i) for i in (2, 3)]
        time.sleep(window + 0.1)  # these two have waited out a whole window meanwhile
        released = time.monotonic()
        release.set()
        assert first.result(5) == 1
        assert sorted(f.result(5) for f in queued) == [2, 3]
    assert started_runs[1] - released < window / 2


def test_an_automatic_batch_size_follows_the_provider(tmp_path: Path) -> None:
    auto = BatchPolicy(max_rows=0, window_seconds=None)
    cpu = auto.for_provider("CPUExecutionProvider")
    cuda = auto.for_provider("CUDAExecutionProvider")
    assert (cpu.max_rows, cpu.window_seconds) == (4, 0.0)
    assert (cuda.max_rows, cuda.window_seconds) == (32, 0.005)
    fixed = BatchPolicy(max_rows=7, window_seconds=0.002).for_provider("CPUExecutionProvider")
    assert (fixed.max_rows, fixed.window_seconds) == (7, 0.002)
    model = LoadedModel(
        "tiny", write_model_folder(tmp_path / "tiny"), CPU, cache_dir=None, batch_policy=auto
    )
    assert model.batch_policy is not None
    assert model.batch_policy.max_rows == 4
    assert (Settings().max_batch, Settings().batch_window_ms) == (0, None)
