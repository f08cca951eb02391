"""Graceful shutdown: SIGTERM turns readiness 503, in-flight requests finish, exit status 0."""

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import httpx2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.lifecycle import Drain, drain_on_sigterm
from tests.conftest import make_client
from tests.images import encode, solid
from tests.servers import free_port
from tests.tiny_models import write_model_folder

# About 2 s of one CPU thread for one image (a 1024x1024 MatMul is ~2 GFLOP).
SLOW_STEPS = 150


def slow_model(path: Path, steps: int = SLOW_STEPS, side: int = 1024) -> None:
    """logits = the per-channel means of the input, after `steps` MatMul+Tanh of a big matrix
    that depends on the input (so onnxruntime cannot fold it away) and adds nothing."""
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(side, side)) / np.sqrt(side)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("ReduceMean", ["x"], ["level"], keepdims=0),
        helper.make_node("Add", ["w", "level"], ["m0"]),
    ]
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "w"], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"m{steps}"], ["busy"], keepdims=0),
        helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
        helper.make_node("Add", ["means", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def answers(url: str, status: int) -> bool:
    try:
        return httpx2.get(url, timeout=1).status_code == status
    except httpx2.TransportError:
        return False


def refuses(url: str) -> bool:
    try:
        httpx2.get(url, timeout=1)
    except httpx2.TransportError:
        return True
    return False


def in_flight(base: str) -> float:
    text = httpx2.get(f"{base}/metrics", timeout=1).text
    found = re.search(r"^onnx_explain_requests_in_flight (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    repository = tmp_path / "models"
    folder = write_model_folder(repository / "slow")
    slow_model(folder / "model.onnx")
    port = free_port()
    env = {
        **os.environ,
        "ONNX_EXPLAIN_MODEL_REPOSITORY": str(repository),
        "ONNX_EXPLAIN_CACHE_DIR": str(tmp_path / "cache"),
        "ONNX_EXPLAIN_PROVIDERS": "cpu",
        "ONNX_EXPLAIN_INTRA_OP_THREADS": "1",
        "ONNX_EXPLAIN_SHUTDOWN_DELAY_SECONDS": "0.5",
        "ONNX_EXPLAIN_SHUTDOWN_GRACE_SECONDS": "15",
        "ONNX_EXPLAIN_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, f"http://127.0.0.1:{port}", log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_sigterm_drains_in_flight_requests_then_exits_zero(
    slow_server: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, base, log_path = slow_server
    wait_for(lambda: answers(f"{base}/readyz", 200), 30, "the server did not become ready")

    image = base64.b64encode(encode(solid((250, 5, 5)))).decode()
    outcome: dict[str, object] = {}

    def slow_request() -> None:
        response = httpx2.post(f"{base}/v1/models/slow/predict", json={"image": image}, timeout=30)
        outcome["status"] = response.status_code
        outcome["label"] = response.json()["predictions"][0]["label"]
        outcome["finished"] = time.monotonic()

    caller = threading.Thread(target=slow_request)
    caller.start()
    # The slow request and the scrape itself.
    wait_for(lambda: in_flight(base) >= 2, 10, "the slow request never started")
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    readiness = httpx2.get(f"{base}/readyz", timeout=2)
    assert readiness.status_code == 503
    assert readiness.json()["status"] == "draining"
    assert readiness.headers["connection"] == "close"
    # After the delay the listener closes, while the slow request is still being answered.
    wait_for(lambda: refuses(f"{base}/healthz"), 5, "the listener stayed open")
    refused = time.monotonic()

    caller.join(timeout=30)
    log = log_path.read_text(errors="replace")
    assert outcome.get("status") == 200, log
    assert outcome["label"] == "red"
    finished = outcome["finished"]
    assert isinstance(finished, float)
    assert signalled < refused < finished, "the request ended before the listener closed"
    assert process.wait(timeout=15) == 0, log
    assert time.monotonic() - signalled < 15
    assert '"message": "SIGTERM: draining' in log  # JSON lines


def test_sigterm_marks_draining_at_once_and_hands_over_after_the_delay() -> None:
    calls: list[float] = []

    def previous(sig: int, frame: FrameType | None) -> None:
        calls.append(time.monotonic())

    original = signal.signal(signal.SIGTERM, previous)
    try:
        drain = Drain()
        with drain_on_sigterm(drain, delay_seconds=0.3):
            signal.raise_signal(signal.SIGTERM)
            sent = time.monotonic()
            assert drain.draining
            assert calls == []  # still serving: load balancers see the 503 first
            wait_for(lambda: len(calls) == 1, 3, "the handler before was never called")
            assert calls[0] - sent >= 0.25
            signal.raise_signal(signal.SIGTERM)  # after the handover: passed on at once
            assert len(calls) == 2
        assert signal.getsignal(signal.SIGTERM) is previous  # restored at shutdown

        with drain_on_sigterm(Drain(), delay_seconds=30):
            signal.raise_signal(signal.SIGTERM)
            assert len(calls) == 2
            signal.raise_signal(signal.SIGTERM)  # a second SIGTERM cuts the wait short
            assert len(calls) == 3
    finally:
        signal.signal(signal.SIGTERM, original)


def test_readiness_reports_draining(tiny_repository_dir: Path) -> None:
    with make_client(tiny_repository_dir) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.drain.begin()  # type: ignore[attr-defined]
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "draining"
        assert response.headers["connection"] == "close"
        assert client.get("/healthz").status_code == 200  # alive, just leaving
