"""The OpenAPI document of the API, with what FastAPI cannot infer: the real status codes of
every route (OpenAI-shaped error bodies) and `text/event-stream` for streamed generations."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
ERRORS = {
    "400": "Invalid request: the field, value and bound are named", "401": "Missing or wrong key",
    "404": "Unknown model or route", "429": "Rate limit exceeded (Retry-After)",
    "503": "Overloaded, draining, loading or no replica (Retry-After)",
    "504": "The request ran past request_timeout_s",
}
GENERATION = ("/v1/completions", "/v1/chat/completions")
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"},
                               "description": "seconds to wait before retrying"}}


def _error(description: str, status: str) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    if status in ("429", "503"):
        out["headers"] = RETRY_AFTER
    return out


def api_schema(app: FastAPI) -> dict[str, Any]:
    """Built once per app (cached on it), like FastAPI's own `app.openapi()`."""
    cached = getattr(app.state, "openapi_schema", None)
    if cached is not None:
        return cached
    doc = get_openapi(title=app.title, version="1", routes=app.routes)
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)         # validation errors are answered as 400
            for status, text in ERRORS.items():
                if status in ("429", "504") and not path.startswith("/v1/"):
                    continue
                responses.setdefault(status, _error(text, status))
            if path in GENERATION:
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "string", "description": "SSE chunks, then data: [DONE]"}}
    doc.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    app.state.openapi_schema = doc
    return doc
