"""`ExplainClient`: the service's HTTP API as typed Python calls, over httpx2."""

import base64
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx2
import numpy as np
import png
from pydantic import BaseModel, ValidationError

from onnx_explain_client.errors import ClientError, ConnectionFailed, ServiceError
from onnx_explain_client.results import ExplainResult
from onnx_explain_client.schemas.errors import ErrorDetail, ErrorResponse
from onnx_explain_client.schemas.explain import (
    ExplainResponse,
    MetricName,
    OutputOptions,
    ParamValue,
    Target,
)
from onnx_explain_client.schemas.heatmap import HeatmapFormat
from onnx_explain_client.schemas.models import ModelInfo, ModelList, ModelSummary, Readiness
from onnx_explain_client.schemas.predict import PredictResponse

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 120.0
API_KEY_HEADER = "X-API-Key"

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str] | np.ndarray
"""Encoded image bytes, the path of an image file, or an RGB uint8 array (sent as PNG)."""
Output = OutputOptions | Mapping[str, Any]
Params = Mapping[str, ParamValue | list[float]]

Answer = TypeVar("Answer", bound=BaseModel)
ProgressCallback = Callable[[int, int, str | None], None]
"""Called with (done, total, stage) for each progress event of a streamed answer."""


class StreamEvent(BaseModel):
    """One line of a streamed answer: progress, the result, or the error."""

    done: int | None = None
    total: int | None = None
    stage: str | None = None
    result: dict[str, Any] | None = None
    error: ErrorDetail | None = None


def encode_png(image: np.ndarray) -> bytes:
    """An RGB uint8 array (H, W, 3) -> PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ClientError(
            f"an image array must be RGB uint8 of shape (H, W, 3), got {image.dtype} {image.shape}"
        )
    height, width = image.shape[:2]
    buffer = io.BytesIO()
    writer = png.Writer(width, height, greyscale=False, bitdepth=8)
    writer.write(buffer, np.ascontiguousarray(image).reshape(height, width * 3))
    return buffer.getvalue()


def image_bytes(image: ImageSource) -> bytes:
    """What gets uploaded for `image`: the bytes as given, a file's content, or a PNG."""
    if isinstance(image, np.ndarray):
        return encode_png(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = Path(image)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read image {path}: {exc.strerror or exc}") from exc


def output_options(
    output: Output | None, formats: HeatmapFormat | Sequence[HeatmapFormat] | None
) -> dict[str, Any]:
    """The request's `output` object; `formats`, when given, replaces its `format`."""
    if isinstance(output, OutputOptions):
        options = output.model_dump(mode="json", exclude_unset=True)
    else:
        options = dict(output or {})
    if formats is not None:
        options["format"] = [formats] if isinstance(formats, str) else list(formats)
    return options


def _service_error(response: httpx2.Response) -> ServiceError:
    try:
        error = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        text = " ".join(response.text.split())[:200] or response.reason_phrase
        return ServiceError(response.status_code, "http_error", f"HTTP error: {text}")
    return ServiceError(response.status_code, error.code, error.message)


class ExplainClient:
    """A connection to one onnx-explain service.

    >>> with ExplainClient("http://127.0.0.1:8000") as client:
    ...     result = client.explain("cat.png", "efficientnet-lite0", "gradcam", formats=["array"])
    ...     heatmap = result.explanations[0].array

    Every failure raises `ClientError`: `ServiceError` (with `status`, `code`, `message`) when
    the service answered with an error, `ConnectionFailed` when it could not be reached.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout: float | None = DEFAULT_TIMEOUT,
        api_key: str | None = None,
        *,
        transport: httpx2.BaseTransport | None = None,
    ) -> None:
        """`timeout` in seconds for each call (None: wait forever); `transport` replaces
        httpx's own (e.g. `httpx2.HTTPTransport(retries=3)`)."""
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        headers = {"accept": "application/json"}
        if api_key is not None:
            headers[API_KEY_HEADER] = api_key
        self._http = httpx2.Client(
            base_url=self.base_url, timeout=timeout, headers=headers, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def readiness(self) -> Readiness:
        """`GET /readyz`: whether the models are loaded (a 503 answer is parsed too)."""
        response = self._send("GET", "/readyz")
        if response.status_code == 503:
            return self._parse(Readiness, response)
        return self._answer(Readiness, response)

    def models(self) -> list[ModelSummary]:
        """`GET /v1/models`: every model in the repository, with its state."""
        return self._answer(ModelList, self._send("GET", "/v1/models")).models

    def model(self, name: str) -> ModelInfo:
        """`GET /v1/models/{name}`: input spec, labels count, provider, Grad-CAM layers."""
        return self._answer(ModelInfo, self._send("GET", self._model_path(name)))

    def predict(self, image: ImageSource, model: str, top_k: int = 5) -> PredictResponse:
        """`POST /v1/models/{model}/predict`: the top-k classes of one image."""
        body = {"image": self._image_field(image), "top_k": top_k}
        response = self._send("POST", self._model_path(model, "predict"), body)
        return self._answer(PredictResponse, response)

    def explain(
        self,
        image: ImageSource,
        model: str,
        method: str,
        targets: Sequence[Target] | None = None,
        top_k: int = 1,
        params: Params | None = None,
        output: Output | None = None,
        formats: HeatmapFormat | Sequence[HeatmapFormat] | None = None,
        metrics: Sequence[MetricName] = (),
        metric_steps: int | None = None,
        curves: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> ExplainResult:
        """`POST /v1/models/{model}/explain`: one heatmap per target and requested format.

        `targets` are class indices or label names (default: the `top_k` predicted classes);
        `output` holds the rendering options (README, "Explanations"); `formats` is a shortcut
        for its `format`. `metrics` ("deletion", "insertion") adds each map's faithfulness
        scores (with `curves`, the curves too). With `on_progress`, the answer is streamed and
        `on_progress(done, total, stage)` is called for each progress event.
        """
        body: dict[str, Any] = {
            "image": self._image_field(image),
            "method": method,
            "top_k": top_k,
        }
        if targets is not None:
            body["targets"] = list(targets)
        if params:
            body["params"] = dict(params)
        options = output_options(output, formats)
        if options:
            body["output"] = options
        if metrics:
            body["metrics"] = list(metrics)
        if metric_steps is not None:
            body["metric_steps"] = metric_steps
        if curves:
            body["curves"] = True
        path = self._model_path(model, "explain")
        if on_progress is not None:
            answer = self._streamed(ExplainResponse, path, body, on_progress)
            return ExplainResult.from_response(answer)
        response = self._send("POST", path, body)
        return ExplainResult.from_response(self._answer(ExplainResponse, response))

    def _streamed(
        self,
        schema: type[Answer],
        path: str,
        body: dict[str, Any],
        on_progress: ProgressCallback,
    ) -> Answer:
        """POST with `"stream": true`: progress events to `on_progress`, then the answer."""
        where = f"{self.base_url}{path}"
        headers = {"accept": "application/x-ndjson"}
        try:
            with self._http.stream(
                "POST", path, json={**body, "stream": True}, headers=headers
            ) as response:
                if not response.is_success:
                    response.read()
                    raise _service_error(response)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    event = StreamEvent.model_validate_json(line)
                    if event.error is not None:
                        raise ServiceError(
                            response.status_code, event.error.code, event.error.message
                        )
                    if event.result is not None:
                        return schema.model_validate(event.result)
                    if event.done is not None and event.total is not None:
                        on_progress(event.done, event.total, event.stage)
        except ValidationError as exc:
            raise ClientError(
                f"unexpected event from {where}: {exc.error_count()} bad field(s)"
            ) from exc
        except httpx2.TimeoutException as exc:
            raise ConnectionFailed(f"no answer from {where} in time ({exc})") from exc
        except httpx2.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {where}: {exc}") from exc
        raise ConnectionFailed(f"{where} closed the stream before answering")

    @staticmethod
    def _image_field(image: ImageSource) -> str:
        return base64.b64encode(image_bytes(image)).decode("ascii")

    @staticmethod
    def _model_path(name: str, action: str | None = None) -> str:
        path = f"/v1/models/{quote(name, safe='')}"
        return f"{path}/{action}" if action else path

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx2.Response:
        where = f"{self.base_url}{path}"
        try:
            return self._http.request(method, path, json=body)
        except httpx2.TimeoutException as exc:
            raise ConnectionFailed(f"no answer from {where} in time ({exc})") from exc
        except httpx2.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {where}: {exc}") from exc
        except httpx2.HTTPError as exc:
            raise ClientError(f"{method} {where} failed: {exc}") from exc

    def _answer(self, schema: type[Answer], response: httpx2.Response) -> Answer:
        if not response.is_success:
            raise _service_error(response)
        return self._parse(schema, response)

    @staticmethod
    def _parse(schema: type[Answer], response: httpx2.Response) -> Answer:
        try:
            return schema.model_validate_json(response.content)
        except ValidationError as exc:
            raise ClientError(
                f"unexpected answer from {response.request.url} (HTTP {response.status_code}): "
                f"{exc.error_count()} field(s) do not match {schema.__name__}"
            ) from exc
