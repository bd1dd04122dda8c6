"""The outer gate: load shedding inside Serve's HTTP proxy, before a request is routed at all.

A refusal from the ingress still costs the proxy a routed call (router, actor call, streamed
reply) and the ingress an ASGI request: at 200 streaming clients on 2 cores that round trip was
most of a refusal's time at the client (proxy entry -> response start 136 ms p50 / 1.0 s p99,
against 5 ms p99 inside the ingress; docs/serving.md). This gate runs in the proxy process as
an ASGI middleware (Serve's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, set by the launcher)
and answers 503 there, with the same OpenAI body and Retry-After as the ingress, once
`max_inflight` generation requests are in flight through this proxy.

Two caps. The total (`DFASTLLM_PROXY_MAX_INFLIGHT`, the sum of every model's `max_inflight`) is
checked first, before any await. With several models (`DFASTLLM_PROXY_MODEL_CAPS`, a JSON object
model -> cap), the gate then reads the small JSON body for its `model` and refuses once that
model's requests fill its cap, then replays the body to Serve: without it, a load on one model
of two passed the total cap twice over and half the overload was refused by the ingress, after
a routed round trip (the slow refusals the gate exists to avoid). The proxy counts HTTP requests
and the ingress engine requests (choices), so the proxy is never the stricter of the two; it
counts a request until its response has been sent, after the ingress has let go of it, so its
count is never below the ingress's and it is the gate that closes first.

Draining. Under the launcher (`python -m dfastllm_ray.serve run`) the gate also refuses every
new generation request once `DFASTLLM_DRAIN_FILE` exists: the launcher creates it in its
SIGTERM handler, before its drain call reaches the ingress, so a request sent after the signal
is not admitted in the moment that call takes (one stat per generation request).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Optional

from .admission import DRAINING, EWMA_WEIGHT, at_capacity, retry_after_s
from .errors import APIError, overloaded, unavailable

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"   # read by Serve's proxy at start
CALLBACK = "dfastllm_ray.serve.proxy_gate:proxy_middlewares"
MAX_INFLIGHT_ENV = "DFASTLLM_PROXY_MAX_INFLIGHT"            # the cap; unset or 0: no gate
MODEL_CAPS_ENV = "DFASTLLM_PROXY_MODEL_CAPS"                # JSON {model: cap}; unset: total only
DRAIN_FILE_ENV = "DFASTLLM_DRAIN_FILE"       # set by the launcher; once the file exists: draining
MAX_PEEK_BYTES = 1 << 20    # a larger body is not parsed here: the total cap and the ingress apply
# the same routes as api.GENERATION_PATHS (not imported: api pulls FastAPI and the engine into
# the proxy process); matched as suffixes so an app under a route prefix is gated too
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
FULL = "Too many requests in flight; retry shortly."


class ProxyGate:
    """Pure ASGI middleware (no BaseHTTPMiddleware): counts the generation requests in flight
    through this proxy, in all and per model, and refuses past `max_inflight` or a model's cap.
    The body is read (and replayed) only when there are two or more model caps."""

    def __init__(self, app: Any, max_inflight: int,
                 model_caps: Optional[dict[str, int]] = None,
                 drain_file: Optional[str] = None) -> None:
        if max_inflight < 1:
            raise ValueError(f"{MAX_INFLIGHT_ENV}={max_inflight} must be >= 1 (or unset)")
        self.app = app
        self.max_inflight = max_inflight
        self.model_caps = dict(model_caps or {})
        self.drain_file = drain_file      # exists: the launcher got SIGTERM, admit nothing new
        self.inflight = 0                 # generation requests let through, not yet answered
        self.model_inflight = {m: 0 for m in self.model_caps}
        self.refused = 0
        self.latency_s = 1.0              # EWMA of admitted requests' latency (s): Retry-After

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not _is_generation(scope):
            return await self.app(scope, receive, send)
        if self.drain_file and os.path.exists(self.drain_file):
            return await self._refuse(scope, send, DRAINING)
        if self.inflight >= self.max_inflight:
            # decided before any await: a refusal never queues behind the streams it protects
            return await self._refuse(scope, send, FULL)
        self.inflight += 1                # reserved before the body is read
        counted = None                    # the capped model this request holds a place of
        try:
            if len(self.model_caps) > 1:
                model, receive = await peek_model(receive)
                cap = self.model_caps.get(model or "")
                if cap is not None and self.model_inflight[model] >= cap:
                    return await self._refuse(scope, send, at_capacity(model, cap))
                if cap is not None:       # no await since the check
                    counted = model
                    self.model_inflight[model] += 1
            await self._admitted(scope, receive, send)
        finally:
            self.inflight -= 1
            if counted is not None:
                self.model_inflight[counted] -= 1

    async def _admitted(self, scope: dict, receive: Any, send: Any) -> None:
        t0, status, replaced = time.perf_counter(), [0], [False]

        async def watch(message: dict) -> None:
            if replaced[0]:                   # Serve's 404 body, already answered for
                return
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if _serve_not_found(message):
                    replaced[0] = True
                    return await self._send(scope, send, not_deployed(scope.get("path", "")))
            await send(message)
        await self.app(scope, receive, watch)
        if status[0] == 200:
            self.latency_s += EWMA_WEIGHT * (time.perf_counter() - t0 - self.latency_s)

    async def _refuse(self, scope: dict, send: Any, message: str) -> None:
        self.refused += 1
        await self._send(scope, send, overloaded(message,
                                                 retry_after_s=retry_after_s(self.latency_s)))

    async def _send(self, scope: dict, send: Any, err: APIError) -> None:
        body = json.dumps(err.body()).encode()
        # the proxy's own request-id middleware sits inside this one: add the header here
        rid = dict(scope.get("headers") or []).get(b"x-request-id") or uuid.uuid4().hex.encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"x-request-id", rid)]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def peek_model(receive: Any) -> tuple[Optional[str], Any]:
    """Read the request body's messages (up to MAX_PEEK_BYTES) and parse its `model`; returns
    it (None: not JSON, no string `model`, too large, or the client left) and a `receive` that
    replays the messages read, in order, before asking the real one."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":            # http.disconnect: replayed as is
            break
        size += len(message.get("body", b""))
        if not message.get("more_body") or size > MAX_PEEK_BYTES:
            break
    model = None
    if messages[-1]["type"] == "http.request" and not messages[-1].get("more_body"):
        try:
            body = json.loads(b"".join(m.get("body", b"") for m in messages))
        except (ValueError, RecursionError):             # not JSON, or nested past the
            body = None                                  # parser's depth: the ingress's 400
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"]
    replay = iter(messages)

    async def replayed() -> dict:
        return next(replay, None) or await receive()
    return model, replayed


def _serve_not_found(message: dict) -> bool:
    """Serve's own "Path ... not found" (plain text; the ingress's 404s are JSON): no app serves
    the path, which for a generation route means the app is not deployed yet."""
    headers = dict(message.get("headers") or [])
    return message["status"] == 404 and headers.get(b"content-type", b"").startswith(b"text/plain")


def not_deployed(path: str) -> APIError:
    """503 + Retry-After (OpenAI's clients retry it) rather than Serve's plain-text 404 (a
    NotFoundError, which they do not) in the seconds before the app is deployed."""
    return unavailable(f"No application serves {path!r} yet: the server is starting; retry "
                       "shortly. If this lasts, the application failed to deploy (`serve "
                       "status` and the server's output say why) or the path is outside every "
                       "application's route_prefix.", retry_after_s=2)


def _is_generation(scope: dict) -> bool:
    return (scope["type"] == "http" and scope.get("method") == "POST"
            and scope.get("path", "").endswith(GENERATION_PATHS))


def max_inflight_from_env() -> Optional[int]:
    raw = os.environ.get(MAX_INFLIGHT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{MAX_INFLIGHT_ENV}={raw!r} must be an integer >= 0 (the most "
                         "generation requests the proxy admits at once; 0: no gate)")
    return value or None


def model_caps_from_env() -> dict[str, int]:
    raw = os.environ.get(MODEL_CAPS_ENV, "").strip()
    if not raw:
        return {}
    try:
        caps = json.loads(raw)
    except ValueError:
        caps = None
    if not isinstance(caps, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 1 for k, v in caps.items()):
        raise ValueError(f"{MODEL_CAPS_ENV}={raw!r} must be a JSON object of model id -> cap "
                         '>= 1, e.g. {"tiny-llada": 64, "tiny-dream": 64}')
    return caps


def proxy_middlewares() -> list:
    """Serve's proxy callback: the gate when `DFASTLLM_PROXY_MAX_INFLIGHT` is set, else none."""
    from starlette.middleware import Middleware
    from .priority import PROXY_NICENESS_ENV, restore_priority
    restore_priority("HTTP proxy", PROXY_NICENESS_ENV)   # once, in the proxy process, at start
    cap = max_inflight_from_env()
    if cap is None:
        return []
    return [Middleware(ProxyGate, max_inflight=cap, model_caps=model_caps_from_env(),
                       drain_file=os.environ.get(DRAIN_FILE_ENV) or None)]
