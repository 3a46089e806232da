"""The OpenAPI document as the API behaves. Bodies are parsed by `parse_body` (strict JSON,
clean 400s), so FastAPI does not see them: `request_body` puts their schema in all the
same. Bad input is always a 400 in OpenAI's error shape, so FastAPI's default 422
(which never happens here) gives way to that 400, and every other error status is
documented in the same shape."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
ERROR = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": NULLABLE_STRING, "code": NULLABLE_STRING},
    }},
}
AS_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
BAD_REQUEST = {"description": "Invalid request: the error names the field (`param`)",
               "content": AS_ERROR}
# 401, 403, 404, 413, 429 (with retry-after), 503 (with retry-after): all in one shape
OTHER_ERRORS = {"description": "Any other refusal or failure, in the same shape",
                "content": AS_ERROR}
LOCAL_REF = "#/$defs/"
COMPONENT_REF = "#/components/schemas/"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """Route keyword arguments that document `model` as the JSON request body."""
    return {"openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}}


def describe(app: FastAPI) -> dict[str, Any]:
    """Build (once) the document FastAPI serves at /openapi.json."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description=app.description)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = ERROR
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if "requestBody" in operation or operation.get("parameters"):
                responses.setdefault("400", BAD_REQUEST)
            responses.setdefault("default", OTHER_ERRORS)
            for media in operation.get("requestBody", {}).get("content", {}).values():
                media["schema"] = _hoist(media.get("schema", {}), schemas)
    app.openapi_schema = doc
    return doc


def _hoist(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """Move a pydantic schema's `$defs` into the document's components (a `#/$defs/...`
    reference resolves against the document root, where there are none), renaming any
    that would clash with a different schema of the same name."""
    defs: dict[str, Any] = schema.pop("$defs", {})
    names: dict[str, str] = {}
    for name, definition in defs.items():
        unique, n = name, 1
        while unique in schemas and schemas[unique] != _relinked(definition, {}):
            n += 1
            unique = f"{name}{n}"
        names[name] = unique
    for name, definition in defs.items():
        schemas[names[name]] = _relinked(definition, names)
    hoisted: dict[str, Any] = _relinked(schema, names)
    return hoisted


def _relinked(node: Any, names: dict[str, str]) -> Any:
    """`node` with its `#/$defs/NAME` references pointing at the components."""
    if isinstance(node, dict):
        return {k: COMPONENT_REF + names.get(v[len(LOCAL_REF):], v[len(LOCAL_REF):])
                if k == "$ref" and isinstance(v, str) and v.startswith(LOCAL_REF)
                else _relinked(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_relinked(v, names) for v in node]
    return node
