"""`"stream": true` on explain: NDJSON (or Server-Sent Events) progress, then the answer."""

import base64
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.images import encode, photo

URL = "/v1/models/efficientnet-lite0/explain"
# Window 56, stride 28 on 224x224: 7 x 7 = 49 occluded copies.
OCCLUSION = {"method": "occlusion", "params": {"window": 56, "stride": 28}}
OCCLUSION_PASSES = 49


def body(**fields: Any) -> dict[str, Any]:
    return {
        "image": base64.b64encode(encode(photo("chelsea"))).decode(),
        "targets": [281],
        "output": {"format": "array", "normalize": "none", "size": "model"},
        **fields,
    }


def ndjson_events(client: TestClient, request: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", URL, json={**request, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.iter_lines() if line]


def sse_events(client: TestClient, request: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    headers = {"Accept": "text/event-stream"}
    with client.stream("POST", URL, json={**request, "stream": True}, headers=headers) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = reply.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def array_of(explanation: dict[str, Any]) -> np.ndarray:
    heatmap = explanation["heatmap"]
    data = np.frombuffer(base64.b64decode(heatmap["data"]), "<f4")
    return data.reshape(tuple(heatmap["shape"]))


def test_occlusion_streams_progress_every_few_percent_then_the_same_map(
    client: TestClient,
) -> None:
    events = ndjson_events(client, body(**OCCLUSION))
    progress, last = events[:-1], events[-1]
    assert progress, "no progress before the answer"
    assert {e["stage"] for e in progress} == {"occlusion"}
    assert {e["total"] for e in progress} == {OCCLUSION_PASSES}
    done = [e["done"] for e in progress]
    assert done == sorted(set(done))
    assert done[-1] == OCCLUSION_PASSES
    gaps = np.diff([0, *done]) / OCCLUSION_PASSES
    assert gaps.max() <= 0.05
    plain = client.post(URL, json=body(**OCCLUSION))
    assert plain.status_code == 200, plain.text
    streamed_map = array_of(last["result"]["explanations"][0])
    # Streaming runs smaller batches: equal up to float rounding.
    np.testing.assert_allclose(
        streamed_map, array_of(plain.json()["explanations"][0]), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    ("method", "params", "rows"),
    [
        ("smoothgrad", {"samples": 6}, 6),
        ("integrated_gradients", {"steps": 5}, 5),
    ],
)
def test_batched_gradients_stream_their_rows(
    client: TestClient, method: str, params: dict[str, Any], rows: int
) -> None:
    # Two targets: one count over both, rows per target.
    request = body(method=method, params=params, targets=[281, 285])
    events = ndjson_events(client, request)
    progress = events[:-1]
    assert [e["done"] for e in progress] == list(range(1, 2 * rows + 1))
    assert {e["total"] for e in progress} == {2 * rows}
    assert len(events[-1]["result"]["explanations"]) == 2


def test_metrics_stream_as_stages_of_their_own(client: TestClient) -> None:
    request = body(method="gradcam", metrics=["deletion", "insertion"], metric_steps=4)
    events = ndjson_events(client, request)
    stages = [e["stage"] for e in events[:-1]]
    assert stages == ["deletion"] * 5 + ["insertion"] * 5
    metrics = events[-1]["result"]["explanations"][0]["metrics"]
    assert 0.0 <= metrics["deletion_auc"] <= 1.0
    assert 0.0 <= metrics["insertion_auc"] <= 1.0


def test_server_sent_events_for_browsers(client: TestClient) -> None:
    events = sse_events(client, body(**OCCLUSION))
    kinds = [kind for kind, _ in events]
    assert kinds == ["progress"] * (len(events) - 1) + ["result"]
    assert events[-2][1]["done"] == OCCLUSION_PASSES
    assert events[-1][1]["result"]["method"] == "occlusion"


def test_an_error_after_the_stream_opened_is_its_last_event(client: TestClient) -> None:
    request = body(method="occlusion", params={"window": 8, "stride": 1, "max_passes": 10})
    events = ndjson_events(client, request)
    assert events[-1]["error"]["code"] == "too_much_work"
    assert all("result" not in e for e in events)


def test_a_short_method_streams_just_its_answer(client: TestClient) -> None:
    events = ndjson_events(client, body(method="gradcam"))
    assert len(events) == 1
    assert events[0]["result"]["explanations"][0]["target"] == 281


def test_bad_requests_are_refused_before_any_stream(client: TestClient) -> None:
    response = client.post(URL, json={**body(method="nope"), "stream": True})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    response = client.post(URL, json={**body(method="gradcam"), "stream": "yes please"})
    assert response.status_code == 422


def test_the_service_keeps_answering_after_a_client_leaves_a_stream(client: TestClient) -> None:
    with client.stream("POST", URL, json={**body(**OCCLUSION), "stream": True}) as response:
        first = next(response.iter_lines())
        assert "done" in json.loads(first)
    # The stream was dropped after one event; the next request is answered in full.
    answer = client.post(URL, json=body(method="gradcam"))
    assert answer.status_code == 200, answer.text
