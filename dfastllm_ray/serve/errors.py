"""OpenAI-style errors: one exception type carrying the HTTP status, and the JSON body clients parse.

The official `openai` client picks its exception class from the status code and reads
`{"error": {"message", "type", "param", "code"}}`, so every refusal (bad JSON, unknown model, bad
knob, auth, rate limit, overload, timeout) goes through `APIError` and `error_body`.
"""
from __future__ import annotations

import re
from typing import Any, Optional

# status -> OpenAI error `type` (the strings OpenAI's own API returns)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}

# SamplingParams writes "name=value is invalid: rule"; the name becomes the error's `param`.
_PARAM_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


class APIError(Exception):
    """A refusal with its HTTP status; `headers` carries e.g. Retry-After on 429/503."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(exc: ValueError, default_param: Optional[str] = None) -> APIError:
    """Map a `SamplingParams`/validation `ValueError` to 400, naming the field it names."""
    text = str(exc)
    match = _PARAM_RE.match(text)
    return bad_request(text, param=match.group(1) if match else default_param)


def model_not_found(model: str, available: list[str]) -> APIError:
    return APIError(404, f"The model {model!r} does not exist; this server serves {available}.",
                    param="model", code="model_not_found")


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    """503 with Retry-After: queues are full; the client should back off, never hang."""
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str, retry_after_s: int = 2) -> APIError:
    """503 with Retry-After: no replica of the model can serve right now (lost, restarting)."""
    return APIError(503, message, code="model_unavailable",
                    headers={"Retry-After": str(retry_after_s)})


def rate_limited(retry_after_s: float) -> APIError:
    wait = max(1, int(retry_after_s + 0.999))     # Retry-After is whole seconds (RFC 9110)
    return APIError(429, f"Rate limit exceeded; retry after {wait} s.", code="rate_limit_exceeded",
                    headers={"Retry-After": str(wait)})


def timed_out(timeout_s: float) -> APIError:
    within = f" within {timeout_s:g} s" if timeout_s else " in time"
    return APIError(504, f"The request did not finish{within} and was aborted.",
                    code="request_timeout")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """FastAPI/pydantic body errors -> 400 naming the first offending field (OpenAI uses 400)."""
    if not errors:
        return bad_request("Invalid request body.")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first.get('msg', '')}",
                           code="invalid_json")
    param = ".".join(loc) or None
    where = f" at {param!r}" if param else ""
    value = first.get("input")
    got = "" if value is None or isinstance(value, (dict, list)) else f" (got {value!r:.80})"
    return bad_request(f"{first.get('msg', 'invalid value')}{where}{got}", param=param,
                       code="invalid_value" if loc else "invalid_body")
