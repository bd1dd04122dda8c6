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


# A pydantic `loc` names a Union member it tried ("str", "list[int]", "TextPart") between the
# field names; those are not fields. What each member means, for "must be one of" messages.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|[A-Z]\w*|\w+\[.*\]|function-.*)$")
_MEMBER_NAMES = {"str": "a string", "list[str]": "a list of strings",
                 "list[int]": "a list of token ids", "list[list[int]]": "a list of token-id lists",
                 "list[TextPart]": "a list of text parts", "int": "an integer",
                 "float": "a number", "bool": "a boolean"}
_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}


def validation_error(errors: list[dict[str, Any]],
                     content_type: Optional[str] = None) -> APIError:
    """FastAPI/pydantic body errors -> 400 naming the first offending field, its value and
    what it must be (OpenAI uses 400). `content_type`: the request's header, for the message
    when the body could not be read as JSON at all."""
    if not errors:
        return bad_request("Invalid request body.", code="invalid_body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first.get('msg', '')}",
                           code="invalid_json")
    loc = _loc(first)
    if not loc:
        return _body_error(first, content_type)
    cut = next((i for i, p in enumerate(loc) if isinstance(p, str) and _UNION_MEMBER.match(p)),
               None)
    if cut is not None:          # a Union field: what it is, unless one member went deeper
        first = _union_error(errors, loc[:cut])
        loc = _loc(first)
    param = ".".join(str(p) for p in loc
                     if not (isinstance(p, str) and _UNION_MEMBER.match(p)))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "this field is required"
    elif first.get("type") == "extra_forbidden":
        msg = "no such field in this request (unknown fields are refused; check the spelling)"
    value = first.get("input")
    shown = (value is not None and not isinstance(value, (dict, list, bytes))
             and first.get("type") != "extra_forbidden" and repr(value) not in msg)
    got = f" (got {value!r:.80})" if shown else ""
    return bad_request(f"{param}: {msg}{got}", param=param,
                       code=_CODES.get(str(first.get("type")), "invalid_value"))


def _loc(error: dict[str, Any]) -> list[Any]:
    return [p for p in error.get("loc", ()) if p != "body"]


def _union_error(errors: list[dict[str, Any]], field: list[Any]) -> dict[str, Any]:
    """The error to report for a Union field: the deepest member's (the value had that
    member's shape and failed inside it), or one that lists every member's shape."""
    cut = len(field)                    # _loc(e)[cut]: the member e's error is about
    group = [e for e in errors if _loc(e)[:cut] == field and len(_loc(e)) > cut]
    deepest = max(group, key=lambda e: len(_loc(e)))
    if len(_loc(deepest)) > cut + 1:
        return deepest
    members = [str(_loc(e)[cut]) for e in group]
    names = [_MEMBER_NAMES.get(m, m) for m in dict.fromkeys(members)]
    shape = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return {**group[0], "msg": f"must be {shape}", "type": "union_type"}


def _body_error(first: dict[str, Any], content_type: Optional[str]) -> APIError:
    """The body as a whole: empty, not JSON by its Content-Type, or JSON that is no object."""
    fix = "send a JSON object with Content-Type: application/json"
    if first.get("type") == "missing":
        return bad_request(f"The request body is empty: {fix}.", code="invalid_body")
    if content_type is not None and "json" not in content_type.lower():
        return bad_request(f"The request body was sent as Content-Type: {content_type:.60}, "
                           f"not JSON: {fix}.", code="invalid_body")
    kind = type(first.get("input")).__name__
    return bad_request(f"The request body must be a JSON object (got a JSON {kind}): {fix}.",
                       code="invalid_body")


def http_error(status: int, detail: str, method: str, path: str,
               allow: Optional[str] = None) -> APIError:
    """Starlette's own refusals (no route, wrong method, an unreadable body) with a message
    that says what to do, in the same OpenAI body."""
    if status == 404 and detail == "Not Found":
        return APIError(404, f"No route {path!r} on this server (the OpenAI routes are under "
                        "/v1; /openapi.json lists them).", code="unknown_route")
    if status == 405:
        return APIError(405, f"{method} is not allowed on {path!r}; use {allow or 'another method'}.",
                        code="method_not_allowed")
    if status == 400 and "parsing the body" in detail:   # not UTF-8, or nested too deep
        return bad_request("The request body could not be parsed as JSON (not UTF-8, or "
                           "nested too deeply): send a JSON object.", code="invalid_json")
    return APIError(status, detail)
