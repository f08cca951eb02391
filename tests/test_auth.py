"""Optional API keys: `X-API-Key` on everything but the probes, metrics and the page."""

import hmac
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.auth import key_matches
from service.settings import Settings
from tests.conftest import make_client

KEY_A = "k7Qm2Zr9Xv4Lp8Wn3Bh6"
KEY_B = "Jd5Fs1Gy8Ht3Ku6Mw0Pc-_.~"


@pytest.fixture(scope="module")
def keyed_client(tiny_repository_dir: Path) -> Iterator[TestClient]:
    with make_client(tiny_repository_dir, api_keys=f"{KEY_A}, {KEY_B}") as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("POST", "/v1/models/tiny/predict"),
        ("POST", "/v1/models/tiny/explain"),
        ("GET", "/v1/models/no-such-model"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/healthz/"),
        ("GET", "/static/../v1/models"),
    ],
)
def test_no_key_is_401(keyed_client: TestClient, method: str, path: str) -> None:
    response = keyed_client.request(method, path)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert "X-API-Key" in response.json()["error"]["message"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("wrong", ["", KEY_A[:-1], KEY_A + "x", KEY_A.lower(), "k" * 40])
def test_a_wrong_key_is_401(keyed_client: TestClient, wrong: str) -> None:
    response = keyed_client.get("/v1/models", headers={"X-API-Key": wrong})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert KEY_A not in response.text


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_a_right_key_is_let_through(keyed_client: TestClient, key: str) -> None:
    response = keyed_client.get("/v1/models", headers={"X-API-Key": key})
    assert response.status_code == 200
    assert keyed_client.get("/v1/models/tiny", headers={"X-API-Key": key}).status_code == 200
    # Past the key, the usual errors.
    missing = keyed_client.get("/v1/models/no-such-model", headers={"X-API-Key": key})
    assert missing.status_code == 404


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/", "/static/app.js"])
def test_probes_metrics_and_the_page_need_no_key(keyed_client: TestClient, path: str) -> None:
    assert keyed_client.get(path).status_code == 200


def test_no_keys_means_no_authentication(tiny_client: TestClient) -> None:
    assert tiny_client.get("/v1/models").status_code == 200


def test_every_key_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = (KEY_A.encode(), KEY_B.encode())
    assert key_matches(KEY_A.encode(), keys)
    assert calls == list(keys)  # no early exit on the first match
    assert not key_matches(b"nope", keys)


@pytest.mark.parametrize(
    "keys",
    [
        "changeme",
        "changeme-changeme-changeme",
        "CHANGE_ME_9f8e7d6c5b4a",
        "example-key-8f3a9c2b7d",
        "my-secret-value-7h3k9q",
        "test-key-0123456789abcdef",
        "Password1234567890xyz",
        "your-api-key-here-0000",
        "short-9f8e7d6c",
        "aaaaaaaaaaaaaaaaaaaaaaaa",
        "121212121212121212121212",
        "has space 9f8e7d6c5b4a3",
        f"{KEY_A},changeme",
    ],
)
def test_placeholder_and_weak_keys_are_refused(keys: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(api_keys=keys)
    message = str(raised.value)
    assert "api_keys" in message
    assert keys not in message  # a key never lands in a log
    assert KEY_A not in message


def test_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_EXPLAIN_API_KEYS", f" {KEY_A} ,,{KEY_B},")
    settings = Settings()
    assert settings.api_key_list == [KEY_A, KEY_B]
    assert KEY_A not in repr(settings)
    assert KEY_A not in str(settings.model_dump())
    monkeypatch.setenv("ONNX_EXPLAIN_API_KEYS", "")
    assert Settings().api_key_list == []
    monkeypatch.setenv("ONNX_EXPLAIN_API_KEYS", "secret")
    with pytest.raises(ValidationError):
        Settings()
