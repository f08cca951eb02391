"""Reading an image request sent as JSON (base64) or as a multipart upload."""

import base64
import binascii
import json
import re
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service.errors import InvalidRequest, UnsupportedMediaType, describe_validation_error

RequestModel = TypeVar("RequestModel", bound=BaseModel)

_DATA_URL_PREFIX = re.compile(r"^data:[A-Za-z0-9.+/-]{1,64};base64,")
_WHITESPACE = re.compile(r"\s+")
# Stands in for the uploaded file while the other multipart fields are validated.
_UPLOADED = "uploaded"


def decode_base64_image(text: str) -> bytes:
    payload = _DATA_URL_PREFIX.sub("", text, count=1) if text.startswith("data:") else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass  # Line breaks (MIME-style base64) are allowed: strip whitespace only when needed.
    try:
        return base64.b64decode(_WHITESPACE.sub("", payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("image: not valid base64") from exc


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_image_request(
    request: Request, schema: type[RequestModel]
) -> tuple[RequestModel, bytes]:
    media_type = _media_type(request)
    if media_type in ("", "application/json") or media_type.endswith("+json"):
        return await _read_json(request, schema)
    if media_type == "multipart/form-data":
        return await _read_multipart(request, schema)
    raise UnsupportedMediaType(
        f"content type {media_type[:100]!r} is not accepted: send application/json with a "
        "base64 `image`, or multipart/form-data with an `image` file"
    )


async def read_json_body(request: Request, schema: type[RequestModel]) -> RequestModel:
    """The request's JSON body as `schema`, or InvalidRequest naming the fields."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from exc


async def _read_json(request: Request, schema: type[RequestModel]) -> tuple[RequestModel, bytes]:
    if not (await request.body()).strip():
        raise InvalidRequest('request body is empty: send JSON like {"image": "<base64>"}')
    parsed = await read_json_body(request, schema)
    return parsed, decode_base64_image(getattr(parsed, "image"))  # noqa: B009


async def _read_multipart(
    request: Request, schema: type[RequestModel]
) -> tuple[RequestModel, bytes]:
    try:
        form = await request.form(max_files=1, max_fields=16)
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc
    except HTTPException as exc:
        # Starlette reports a malformed multipart body as its own 400 before we see it.
        raise InvalidRequest(f"malformed multipart body: {exc.detail}") from exc
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("multipart body needs a file field named `image`")
    fields: dict[str, object] = {"image": _UPLOADED}
    for key, value in form.multi_items():
        if key == "image" or not isinstance(value, str):
            continue
        # Non-file fields may carry JSON (numbers, lists, objects); bare words stay strings.
        try:
            fields[key] = json.loads(value)
        except ValueError:
            fields[key] = value
    try:
        parsed = schema.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from exc
    data = await upload.read()
    await upload.close()
    return parsed, data
