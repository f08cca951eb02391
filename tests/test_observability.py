"""Prometheus metrics, request ids and JSON log lines."""

import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.logs import JsonFormatter, configure_logging, request_id_var
from service.metrics import ServiceMetrics
from tests.conftest import make_client
from tests.images import encode, solid

RED = base64.b64encode(encode(solid((250, 5, 5)))).decode()
HEX_ID = re.compile(r"[0-9a-f]{32}")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and labels."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def fresh_client(tiny_repository_dir: Path) -> Iterator[TestClient]:
    """An app of its own, so its counters start at zero."""
    with make_client(tiny_repository_dir) as client:
        yield client


def test_metrics_count_requests_by_model_method_and_status(fresh_client: TestClient) -> None:
    client = fresh_client
    assert client.post("/v1/models/tiny/predict", json={"image": RED}).status_code == 200
    assert client.post("/v1/models/tiny/predict", json={"image": RED}).status_code == 200
    explain = {"image": RED, "method": "gradcam", "output": {"format": "png"}}
    assert client.post("/v1/models/tiny/explain", json=explain).status_code == 200
    bad = {"image": RED, "method": "occlusion", "params": {"window": -1}}
    assert client.post("/v1/models/tiny/explain", json=bad).status_code == 422
    assert client.get("/v1/models/tiny").status_code == 200
    assert client.get("/v1/models/no-such-model").status_code == 404

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    total = "onnx_explain_requests_total"
    assert value(found, total, model="tiny", method="predict", status="200") == 2
    assert value(found, total, model="tiny", method="gradcam", status="200") == 1
    assert value(found, total, model="tiny", method="occlusion", status="422") == 1
    assert value(found, total, model="tiny", method="info", status="200") == 1
    # An unknown name never becomes a label value: the label set stays bounded.
    assert value(found, total, model="", method="info", status="404") == 1
    assert not any("no-such-model" in str(labels) for _, labels in found)

    stage = "onnx_explain_stage_duration_seconds_count"
    assert value(found, stage, stage="decode", model="tiny") == 3
    assert value(found, stage, stage="inference", model="tiny") == 3
    assert value(found, stage, stage="render", model="tiny") == 1
    duration = "onnx_explain_request_duration_seconds_count"
    assert value(found, duration, model="tiny", method="predict") == 2
    assert value(found, "onnx_explain_requests_in_flight") == 1  # this scrape


def test_each_app_has_a_registry_of_its_own(tiny_repository_dir: Path) -> None:
    with make_client(tiny_repository_dir) as first, make_client(tiny_repository_dir) as second:
        assert first.post("/v1/models/tiny/predict", json={"image": RED}).status_code == 200
        name = "onnx_explain_requests_total"
        labels = {"model": "tiny", "method": "predict", "status": "200"}
        assert value(samples(first.get("/metrics").text), name, **labels) == 1
        assert value(samples(second.get("/metrics").text), name, **labels) == 0


def test_batch_size_and_queue_depth_are_reported_per_model() -> None:
    metrics = ServiceMetrics()
    metrics.observe_batch("tiny", 3)
    metrics.set_queue_depth("tiny", 5)
    metrics.on_batch("other", 8, 0)
    metrics.observe_stage("queue", "tiny", 0.002)
    found = samples(metrics.render().decode())
    assert value(found, "onnx_explain_batch_size_bucket", model="tiny", le="4.0") == 1
    assert value(found, "onnx_explain_batch_size_bucket", model="tiny", le="2.0") == 0
    assert value(found, "onnx_explain_batch_size_sum", model="other") == 8
    assert value(found, "onnx_explain_queue_depth", model="tiny") == 5
    assert value(found, "onnx_explain_queue_depth", model="other") == 0
    assert value(found, "onnx_explain_stage_duration_seconds_count", stage="queue", model="tiny")


def test_a_valid_request_id_is_echoed(tiny_client: TestClient) -> None:
    for request_id in ("abc-123", "a.b_c-D", "x" * 128):
        response = tiny_client.get("/healthz", headers={"X-Request-ID": request_id})
        assert response.headers["x-request-id"] == request_id


@pytest.mark.parametrize(
    "request_id", [b"", b"x" * 129, b"has space", b"semi;colon", b"a/b", b"na\xefve"]
)
def test_an_invalid_request_id_is_replaced(tiny_client: TestClient, request_id: bytes) -> None:
    response = tiny_client.get("/healthz", headers={b"X-Request-ID": request_id})
    assert HEX_ID.fullmatch(response.headers["x-request-id"])


def test_a_request_id_is_made_when_none_is_sent(tiny_client: TestClient) -> None:
    first = tiny_client.get("/healthz").headers["x-request-id"]
    second = tiny_client.get("/healthz").headers["x-request-id"]
    assert HEX_ID.fullmatch(first)
    assert HEX_ID.fullmatch(second)
    assert first != second


def boom_app(tiny_repository_dir: Path, **settings: object) -> FastAPI:
    """The service's app with one route that fails in an unexpected way."""
    app = make_client(tiny_repository_dir, **settings).app
    assert isinstance(app, FastAPI)

    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    app.add_api_route("/boom", boom)
    return app


def test_error_answers_carry_the_request_id(tiny_repository_dir: Path) -> None:
    app = boom_app(tiny_repository_dir, max_body_bytes=2048)
    with TestClient(app, raise_server_exceptions=False) as client:
        headers = {"X-Request-ID": "err-1"}
        not_found = client.get("/v1/models/nope", headers=headers)
        invalid = client.post("/v1/models/tiny/predict", content=b"{", headers=headers)
        too_large = client.post("/v1/models/tiny/predict", content=b"x" * 4096, headers=headers)
        crashed = client.get("/boom", headers=headers)
    assert [r.status_code for r in (not_found, invalid, too_large, crashed)] == [404, 422, 413, 500]
    for response in (not_found, invalid, too_large, crashed):
        assert response.headers["x-request-id"] == "err-1"
        assert set(response.json()["error"]) == {"code", "message"}
    assert crashed.json() == {"error": {"code": "internal_error", "message": "internal error"}}


def test_one_access_record_per_request(
    tiny_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        response = tiny_client.post(
            "/v1/models/tiny/predict", json={"image": RED}, headers={"X-Request-ID": "log-1"}
        )
    assert response.status_code == 200
    records = [r for r in caplog.records if r.name == "service.access"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "log-1"
    assert line["method"] == "POST"
    assert line["path"] == "/v1/models/tiny/predict"
    assert line["status"] == 200
    assert line["model"] == "tiny"
    assert line["operation"] == "predict"
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0
    assert line["level"] == "info"
    assert line["logger"] == "service.access"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names
    }
    disabled = logging.getLogger("uvicorn.access").disabled
    yield
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate
    logging.getLogger("uvicorn.access").disabled = disabled


@pytest.mark.usefixtures("restore_logging")
def test_configured_root_logger_writes_json_lines_with_the_request_id(
    tiny_repository_dir: Path,
) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    logging.getLogger("engines.somewhere").info("outside any request", extra={"rows": 3})
    token = request_id_var.set("ctx-7")
    try:
        logging.getLogger("uvicorn.error").warning("from uvicorn")
    finally:
        request_id_var.reset(token)
    with TestClient(boom_app(tiny_repository_dir), raise_server_exceptions=False) as client:
        assert client.get("/boom", headers={"X-Request-ID": "req-9"}).status_code == 500

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first, second = lines[0], lines[1]
    assert first["message"] == "outside any request"
    assert first["rows"] == 3
    assert "request_id" not in first
    assert second["request_id"] == "ctx-7"
    assert second["logger"] == "uvicorn.error"
    in_request = [line for line in lines if line.get("request_id") == "req-9"]
    # The error handler's line (with the traceback) and the access line, both with the id.
    assert any("RuntimeError" in line.get("exception", "") for line in in_request)
    access = [line for line in in_request if line["logger"] == "service.access"]
    assert len(access) == 1
    assert access[0]["status"] == 500
    assert access[0]["path"] == "/boom"


@pytest.mark.usefixtures("restore_logging")
def test_text_format_is_one_plain_line() -> None:
    stream = io.StringIO()
    configure_logging("debug", "text", stream)
    token = request_id_var.set("t-1")
    try:
        logging.getLogger("x").debug("hello %s", "there")
    finally:
        request_id_var.reset(token)
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("DEBUG x: hello there request_id=t-1")
