"""The OpenAPI request bodies of the image routes, read off their request schemas.

FastAPI documents a body it parses itself; these routes read theirs by hand (JSON or
multipart, `service.inputs`), so their `openapi_extra` says what they accept: the schema as
JSON, and the same fields as a multipart form whose `image` is the file and whose other
fields carry JSON text (numbers and words as they are).
"""

from typing import Any

from pydantic import BaseModel

_SCALARS = {"string", "integer", "number", "boolean"}


def inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` written in place of their `$ref`s.

    Inside an OpenAPI document a `#/$defs/...` reference resolves against the document's root,
    which has no `$defs`: the reference would dangle, and tools would fail to read the body.
    """
    definitions: dict[str, Any] = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {key: value for key, value in node.items() if key != "$ref"}
                return inline({**definitions[ref.removeprefix("#/$defs/")], **rest})
            return {key: inline(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


def _form_field(prop: dict[str, Any]) -> dict[str, Any]:
    """A JSON-schema property as a multipart text field."""
    options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
    if len(options) == 1 and (options[0].get("type") in _SCALARS or "enum" in options[0]):
        return {key: value for key, value in options[0].items() if key != "title"}
    kinds = sorted({str(p.get("type", "value")) for p in options})
    return {"type": "string", "description": f"JSON {' or '.join(kinds)}"}


def request_body(
    model: type[BaseModel], example: dict[str, object] | None = None, *, multipart: bool = True
) -> dict[str, object]:
    """`openapi_extra` for a route whose body `model` describes."""
    schema = inline_definitions(model.model_json_schema())
    content: dict[str, object] = {
        "application/json": {"schema": schema} | ({"example": example} if example else {})
    }
    if multipart:
        properties = {
            name: {"type": "string", "format": "binary"} if name == "image" else _form_field(prop)
            for name, prop in schema.get("properties", {}).items()
        }
        content["multipart/form-data"] = {
            "schema": {
                "type": "object",
                "required": list(schema.get("required", [])),
                "properties": properties,
            }
        }
    return {"requestBody": {"required": True, "content": content}}
