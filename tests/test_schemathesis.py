"""Property-based checks of the whole HTTP API against its own `/openapi.json` (Schemathesis).

Every documented operation is called with generated requests, valid and invalid, against the
app over the tiny repository. A response must not be a 5xx (but for the few the API promises),
its status code must be one the operation documents, and its content type and body must match
what the schema declares for that status.
"""

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import Case
from schemathesis.checks import CheckContext, CheckFunction
from schemathesis.core.transport import Response
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engines.models.repository import ModelRepository
from service.app import create_app
from service.settings import Settings
from tests.conftest import CPU, make_client
from tests.images import encode, solid

GOOD_PNG = encode(solid((10, 200, 30)))

# A dozen examples an operation keep the run to seconds; the example database stays off so
# nothing is written into the work tree, and the app's latency is no failure.
SETTINGS = hypothesis.settings(
    max_examples=12,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def _error_code(response: Response) -> str | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return code if isinstance(code, str) else None
    return None


def _promised_5xx(response: Response, case: Case[Any]) -> bool:
    """5xx answers that are the API working as documented, not the server failing."""
    code = _error_code(response)
    if response.status_code == 504 and code == "deadline_exceeded":
        # The caller's own `timeout_ms` (down to 1 ms) ran out.
        return isinstance(case.body, dict) and case.body.get("timeout_ms") is not None
    # The repository's `broken` model failed to load, as it was built to.
    return response.status_code == 503 and code == "model_not_ready"


def no_server_error(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    if _promised_5xx(response, case):
        return None
    return schemathesis.checks.not_a_server_error(ctx, response, case)


CHECKS: list[CheckFunction] = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _load_schema() -> BaseSchema:
    """The document the app serves at /openapi.json; routes and schemas need no model.

    Loaded at import, so Schemathesis can name one test per operation. (Its fixture-based
    loader, `schemathesis.pytest.from_fixture`, fails under pytest 9.2, which dropped the
    `Function._nodeid` attribute that loader rewrites.)
    """
    repository = ModelRepository(Path("/nonexistent/onnx-explain-models"), CPU)
    repository.load_all()  # nothing to load: no loader thread starts with the app
    app = create_app(Settings(model_repository=repository.root, providers="cpu"), repository)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = _load_schema()


@pytest.fixture(scope="module")
def app(tiny_repository_dir: Path) -> Iterator[Any]:
    """The app the generated requests go to: the tiny repository, loaded."""
    with make_client(tiny_repository_dir) as client:
        yield client.app


@schema.parametrize()
@SETTINGS
def test_every_operation_conforms_to_the_schema(case: Case[Any], app: Any) -> None:
    case.call_and_validate(checks=CHECKS, app=app)


def _use_the_tiny_model(case: Case[Any]) -> None:
    """Point the case at the working model with a real image and neutral method parameters.

    Everything else generated stays: top_k, timeout_ms, the method and the output options.
    """
    if "name" in case.path_parameters:
        case.path_parameters["name"] = "tiny"
    if not isinstance(case.body, dict) or "image" not in case.body:
        return
    body: dict[str, Any] = case.body
    multipart = case.media_type == "multipart/form-data"
    body["image"] = GOOD_PNG if multipart else base64.b64encode(GOOD_PNG).decode()
    # Method parameters and targets are validated per method and per model: random ones only
    # ever meet the same 422.
    body.pop("targets", None)
    if "params" in body:
        body["params"] = "{}" if multipart else {}
    if multipart and "output" in body:
        body["output"] = "{}"


@schema.parametrize()
@SETTINGS
def test_operations_on_a_working_model_conform_to_the_schema(case: Case[Any], app: Any) -> None:
    # The first test mostly meets unknown models and undecodable images; this one gets past them
    # into the engines: predictions, every explanation method, every output option.
    _use_the_tiny_model(case)
    case.call_and_validate(checks=CHECKS, app=app)


# Regressions for what Schemathesis found outside the OpenAPI declarations: a 500 for top_k
# above the model's class count (gradient methods), and an undocumented 400 for malformed
# multipart bodies.


@pytest.mark.parametrize("method", ["gradcam", "saliency", "gradient_x_input"])
def test_gradient_methods_with_top_k_above_the_class_count(tiny_client: Any, method: str) -> None:
    image = base64.b64encode(GOOD_PNG).decode()
    response = tiny_client.post(
        "/v1/models/tiny/explain", json={"image": image, "method": method, "top_k": 5}
    )
    assert response.status_code < 500, response.text


MALFORMED_MULTIPART = [
    ("no boundary", "multipart/form-data", b"--x--"),
    ("invalid part", "multipart/form-data; boundary=b0", b"--b0\r\n[]--b0--\r\n"),
]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [case[1:] for case in MALFORMED_MULTIPART],
    ids=[case[0] for case in MALFORMED_MULTIPART],
)
def test_malformed_multipart_is_an_invalid_request(
    tiny_client: Any, content_type: str, body: bytes
) -> None:
    response = tiny_client.post(
        "/v1/models/tiny/predict", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
