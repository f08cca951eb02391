"""The Open Inference Protocol (KServe V2, Triton's HTTP API): health, metadata and inference.

What a standard inference client (tritonclient, KServe's) asks of a model server: liveness and
readiness, server and model metadata, and `infer` on the model's own FP32 input tensor, or on a
BYTES tensor of encoded images, which are decoded and preprocessed as for /predict. Inputs and
outputs come as JSON data or with the binary tensor data extension (the JSON header's length in
`Inference-Header-Content-Length`, raw little-endian tensors after it), which tritonclient uses
by default. Errors are the protocol's `{"error": "<message>"}`, with the service's statuses.
"""

import base64
import binascii
import json
import math
import struct
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from engines.errors import EngineError, InvalidImage
from engines.imaging.decode import decode_image, preprocess
from engines.models.loaded import LoadedModel
from service.errors import (
    RETRY_AFTER_SECONDS,
    ServiceError,
    describe_validation_error,
    engine_status,
)
from service.openapi import inline_definitions
from service.state import State
from service.work import loaded_model, run_engine

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ROWS = 256
"""Images one infer request may carry."""
_FP32 = "FP32"
_BYTES = "BYTES"


class InputTensor(BaseModel):
    name: str = Field(max_length=256)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str = Field(max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = Field(default=None, max_length=256)
    inputs: list[InputTensor] = Field(min_length=1, max_length=4)
    outputs: list[RequestedOutput] | None = Field(default=None, max_length=4)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """The protocol's error answer."""

    error: str


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorBody, "description": "The protocol's error."} for status in statuses
    }


WORK_ERRORS = _documented(400, 404, 413, 415, 422, 500, 503, 504)


class ProtocolError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


async def _answering(make: Callable[[], Awaitable[Response]]) -> Response:
    """The route's answer, or its failure as the protocol's error body."""
    try:
        return await make()
    except ProtocolError as exc:
        return _error(exc.status, exc.message)
    except EngineError as exc:
        return _error(engine_status(exc), exc.message)
    except ServiceError as exc:
        return _error(exc.status_code, exc.message)


def _server_version() -> str:
    try:
        return version("onnx-explain")
    except PackageNotFoundError:  # run from a source tree
        return "0"


@router.get("/health/live", summary="Liveness: the process answers.")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Readiness: 200 once a model serves, 503 before.",
    responses={503: {"description": "No model serves yet."}},
)
async def ready(state: State) -> JSONResponse:
    serving = state.repository.ready
    return JSONResponse(status_code=200 if serving else 503, content={"ready": serving})


@router.get("", summary="Server metadata.")
async def server_metadata() -> dict[str, object]:
    return {
        "name": "onnx-explain",
        "version": _server_version(),
        "extensions": ["binary_tensor_data"],
    }


def _input_shape(model: LoadedModel) -> list[int]:
    return [-1, *model.config.input.image_dims]


@router.get(
    "/models/{name}",
    summary="Model metadata: its input and output tensors.",
    responses=_documented(404, 500, 503),
)
async def model_metadata(name: str, state: State) -> Response:
    async def answer() -> Response:
        model = await loaded_model(state, name)
        return JSONResponse(
            {
                "name": name,
                "versions": ["1"],
                "platform": "onnxruntime_onnx",
                "inputs": [
                    {"name": model.input_name, "datatype": _FP32, "shape": _input_shape(model)}
                ],
                "outputs": [
                    {
                        "name": model.output_name,
                        "datatype": _FP32,
                        "shape": [-1, model.num_classes],
                    }
                ],
            }
        )

    return await _answering(answer)


@router.get(
    "/models/{name}/ready",
    summary="200 when the model is loaded and serves.",
    responses=_documented(404, 503),
)
async def model_ready(name: str, state: State) -> Response:
    async def answer() -> Response:
        entry = state.repository.entry(name)  # 404 for an unknown name
        serves = entry.serves
        return JSONResponse(
            status_code=200 if serves else 503, content={"name": name, "ready": serves}
        )

    return await _answering(answer)


def _split_body(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError as exc:
            raise ProtocolError(400, f"{HEADER_LENGTH} is not a number") from exc
        if not 0 < length <= len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} is outside the body")
        head, rest = body[:length], body[length:]
    try:
        return InferRequest.model_validate_json(head), rest
    except ValidationError as exc:
        raise ProtocolError(400, describe_validation_error(exc)) from exc


def _images(values: list[bytes], model: LoadedModel, state: State) -> np.ndarray:
    images = [decode_image(data, state.image_limits) for data in values]
    return preprocess(images, model.config.input)


def _byte_elements(blob: bytes, count: int) -> list[bytes]:
    """BYTES elements in the binary extension: each a little-endian uint32 length, then it."""
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(blob):
            raise ProtocolError(400, "a BYTES tensor ends before its elements do")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise ProtocolError(400, "a BYTES element runs past the tensor")
        elements.append(blob[offset : offset + size])
        offset += size
    return elements


def _input_tensor(
    tensor: InputTensor, blob: bytes | None, model: LoadedModel, state: State
) -> np.ndarray:
    if tensor.name != model.input_name:
        raise ProtocolError(
            400, f"unknown input {tensor.name!r}: the model's is {model.input_name!r}"
        )
    if any(d < 0 for d in tensor.shape) or not tensor.shape:
        raise ProtocolError(400, f"input shape {tensor.shape} is not a tensor's shape")
    rows, count = tensor.shape[0], math.prod(tensor.shape)
    if not 1 <= rows <= MAX_ROWS:
        raise ProtocolError(400, f"an infer request carries 1 to {MAX_ROWS} images, not {rows}")
    if tensor.datatype == _BYTES:
        if tensor.shape not in ([rows], [rows, 1]):
            raise ProtocolError(400, f"a BYTES input of encoded images is [N], not {tensor.shape}")
        if blob is not None:
            return _images(_byte_elements(blob, rows), model, state)
        try:
            encoded = [base64.b64decode(str(v), validate=True) for v in tensor.data or []]
        except (binascii.Error, ValueError) as exc:
            raise InvalidImage("a BYTES element in JSON must be a base64 image") from exc
        if len(encoded) != rows:
            raise ProtocolError(400, f"the BYTES input holds {len(encoded)} elements, not {rows}")
        return _images(encoded, model, state)
    if tensor.datatype != _FP32:
        raise ProtocolError(400, f"input datatype {tensor.datatype} is not FP32 or BYTES")
    expected = _input_shape(model)[1:]
    if tensor.shape[1:] != expected:
        raise ProtocolError(400, f"input shape {tensor.shape} is not [N, {expected}]")
    try:
        if blob is not None:
            values = np.frombuffer(blob, dtype="<f4")
        else:
            values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(400, "FP32 input data must be numbers") from exc
    if values.size != count:
        raise ProtocolError(400, f"the input holds {values.size} values, its shape {count}")
    return values.astype(np.float32).reshape(tensor.shape)


def _blobs(request: InferRequest, rest: bytes) -> list[bytes | None]:
    """Each input's binary data (None when it came as JSON), in order."""
    blobs: list[bytes | None] = []
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise ProtocolError(400, f"input {tensor.name!r} has no data")
            blobs.append(None)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise ProtocolError(400, f"input {tensor.name!r}: binary_data_size is outside the body")
        blobs.append(rest[offset : offset + size])
        offset += size
    if offset != len(rest):
        raise ProtocolError(400, "the body has bytes after the inputs' binary data")
    return blobs


def _binary_output(request: InferRequest, name: str) -> bool:
    for requested in request.outputs or []:
        if requested.name == name:
            return bool(requested.parameters.get("binary_data", False))
    return bool(request.parameters.get("binary_data_output", False))


@router.post(
    "/models/{name}/infer",
    summary="The model's output tensor for an input tensor.",
    responses=WORK_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": inline_definitions(InferRequest.model_json_schema())
                },
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"The JSON header ({HEADER_LENGTH} bytes), then the inputs' "
                    "binary data.",
                },
            },
        }
    },
)
async def infer(name: str, request: Request, state: State) -> Response:
    async def answer() -> Response:
        model = await loaded_model(state, name)
        parsed, rest = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        if len(parsed.inputs) != 1:
            raise ProtocolError(400, f"the model has one input, {model.input_name!r}")
        for requested in parsed.outputs or []:
            if requested.name != model.output_name:
                raise ProtocolError(400, f"unknown output {requested.name!r}")
        (blob,) = _blobs(parsed, rest)
        timeout = parsed.parameters.get("timeout")
        timeout_ms = int(timeout) // 1000 if isinstance(timeout, int) and timeout > 0 else None

        def work() -> np.ndarray:
            tensor = _input_tensor(parsed.inputs[0], blob, model, state)
            return model.forward(tensor).astype(np.float32)

        outputs = await run_engine(state, timeout_ms, work)
        described: dict[str, Any] = {
            "name": model.output_name,
            "datatype": _FP32,
            "shape": list(outputs.shape),
        }
        head: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": [described]}
        if parsed.id is not None:
            head["id"] = parsed.id
        if not _binary_output(parsed, model.output_name):
            described["data"] = outputs.reshape(-1).tolist()
            return JSONResponse(head)
        data = np.ascontiguousarray(outputs, dtype="<f4").tobytes()
        described["parameters"] = {"binary_data_size": len(data)}
        header = json.dumps(head).encode()
        return Response(
            content=header + data,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(header))},
        )

    return await _answering(answer)
