"""The outer gate: load shedding inside Serve's HTTP proxy, before a request is routed at all.

A refusal from the ingress still costs the proxy a routed call (router, actor call, streamed
reply) and the ingress an ASGI request: at 200 streaming clients on 2 cores that round trip was
most of a refusal's time at the client (proxy entry -> response start 136 ms p50 / 1.0 s p99,
against 5 ms p99 inside the ingress; docs/serving.md). This gate runs in the proxy process as
an ASGI middleware (Serve's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, set by the launcher)
and answers 503 there, with the same OpenAI body and Retry-After as the ingress, once
`max_inflight` generation requests are in flight through this proxy.

It cannot read the body (the model is not known yet), so its cap is the sum of every model's
`max_inflight`: with one model it is that model's cap exactly, with several it bounds their sum
and the ingress's per-model gate stays exact. The proxy counts a request until its response
has been sent, after the ingress has let go of it, so the proxy's count is never below the
ingress's and the proxy is the gate that closes first.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, Optional

from .admission import EWMA_WEIGHT, retry_after_s
from .errors import overloaded

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"   # read by Serve's proxy at start
CALLBACK = "dfastllm_ray.serve.proxy_gate:proxy_middlewares"
MAX_INFLIGHT_ENV = "DFASTLLM_PROXY_MAX_INFLIGHT"            # the cap; unset or 0: no gate
# the same routes as api.GENERATION_PATHS (not imported: api pulls FastAPI and the engine into
# the proxy process); matched as suffixes so an app under a route prefix is gated too
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
FULL = "Too many requests in flight; retry shortly."


class ProxyGate:
    """Pure ASGI middleware (no body buffering, no BaseHTTPMiddleware): counts the generation
    requests in flight through this proxy and refuses past `max_inflight`."""

    def __init__(self, app: Any, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"{MAX_INFLIGHT_ENV}={max_inflight} must be >= 1 (or unset)")
        self.app = app
        self.max_inflight = max_inflight
        self.inflight = 0                 # generation requests let through, not yet answered
        self.refused = 0
        self.latency_s = 1.0              # EWMA of admitted requests' latency (s): Retry-After

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not _is_generation(scope):
            return await self.app(scope, receive, send)
        if self.inflight >= self.max_inflight:
            # decided before any await: a refusal never queues behind the streams it protects
            return await self._refuse(scope, send)
        self.inflight += 1
        t0, status = time.perf_counter(), [0]

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, watch)
        finally:
            self.inflight -= 1
            if status[0] == 200:
                self.latency_s += EWMA_WEIGHT * (time.perf_counter() - t0 - self.latency_s)

    async def _refuse(self, scope: dict, send: Any) -> None:
        self.refused += 1
        err = overloaded(FULL, retry_after_s=retry_after_s(self.latency_s))
        body = json.dumps(err.body()).encode()
        # the proxy's own request-id middleware sits inside this one: add the header here
        rid = dict(scope.get("headers") or []).get(b"x-request-id") or uuid.uuid4().hex.encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"x-request-id", rid)]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


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
        raise ValueError(f"{MAX_INFLIGHT_ENV}={raw!r} must be an integer") from None
    return value or None


def proxy_middlewares() -> list:
    """Serve's proxy callback: the gate when `DFASTLLM_PROXY_MAX_INFLIGHT` is set, else none."""
    from starlette.middleware import Middleware
    cap = max_inflight_from_env()
    return [] if cap is None else [Middleware(ProxyGate, max_inflight=cap)]
